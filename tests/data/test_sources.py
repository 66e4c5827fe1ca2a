"""pipeline/data/sources.py: URLs (through a local HTTP server) with checksums, encodings, streaming,
max_samples."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.sources import JSON_DEPTH_MAX, first_bad_byte, load_raw
from tests.conftest import CORPUS
from tests.support import project_section

JSONL = b'{"text": "first record"}\n{"text": "second record"}\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving a directory, for the URL source."""
    root = tmp_path_factory.mktemp("www")
    (root / "corpus.txt").write_text("one document served over HTTP\n")
    (root / "records.jsonl").write_bytes(JSONL)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def data_params(**changes):
    """The project's data params with these changes, no Hub config."""
    return project_section("data", config=None, **changes)


def test_url_with_matching_sha256(server, tmp_path):
    digest = hashlib.sha256(JSONL).hexdigest()
    raw, provenance = load_raw(data_params(dataset=f"{server}/records.jsonl", sha256=digest), tmp_path)
    assert raw["train"]["text"] == ["first record", "second record"]
    assert provenance["sha256"] == digest and provenance["url"].endswith("/records.jsonl")


def test_url_without_sha256_records_it(server, tmp_path):
    raw, provenance = load_raw(data_params(dataset=f"{server}/corpus.txt"), tmp_path)
    assert raw["train"]["text"] == ["one document served over HTTP\n"]  # one document per file, as written
    assert len(provenance["sha256"]) == 64


def test_url_checksum_mismatch(server, tmp_path):
    with pytest.raises(PipelineError, match=r"data.sha256: .*records.jsonl has SHA-256 [0-9a-f]{64}, not the "
                                            r"expected (00){32}; the file changed"):
        load_raw(data_params(dataset=f"{server}/records.jsonl", sha256="00" * 32), tmp_path)


def test_url_not_found(server, tmp_path):
    with pytest.raises(PipelineError, match="answered HTTP 404"):
        load_raw(data_params(dataset=f"{server}/missing.txt"), tmp_path)


def test_non_utf8_stops_with_file_and_offset_or_is_repaired(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("utf-8") + b" and cr\xe8me\n")
    assert first_bad_byte(bad) == (len("café au lait and cr".encode()), 0xE8)
    with pytest.raises(PipelineError, match=r"latin1.txt is not UTF-8: byte 0xe8 at offset 20; convert it .*"
                                            r"or set data.encoding_errors: replace"):
        load_raw(data_params(dataset=str(bad)), tmp_path / "scratch")
    raw, _ = load_raw(data_params(dataset=str(bad), encoding_errors="replace"), tmp_path / "scratch")
    assert raw["train"]["text"] == ["café au lait and cr\ufffdme\n"]
    raw, _ = load_raw(data_params(dataset=str(bad), encoding_errors="ignore"), tmp_path / "scratch2")
    assert raw["train"]["text"] == ["café au lait and crme\n"]


def test_a_character_split_across_reads_is_not_an_error(tmp_path):
    text = ("x" * ((1 << 26) - 1) + "é").encode("utf-8")  # é's two bytes straddle the 64 MB read boundary
    (tmp_path / "big.txt").write_bytes(text)
    assert first_bad_byte(tmp_path / "big.txt") is None


def test_streaming_gives_the_same_rows(tmp_path):
    plain, _ = load_raw(data_params(dataset=str(CORPUS)), tmp_path / "a")
    (tmp_path / "b").mkdir()
    streamed, provenance = load_raw(data_params(dataset=str(CORPUS), streaming=True), tmp_path / "b")
    assert sorted(streamed["train"]["text"]) == sorted(plain["train"]["text"]) and provenance["streaming"]


def test_max_samples(tmp_path):
    raw, provenance = load_raw(data_params(dataset=str(CORPUS), max_samples=3), tmp_path)
    assert raw["train"].num_rows == 3 and provenance["splits"] == {"train": 3}
    (tmp_path / "s").mkdir()
    streamed, _ = load_raw(data_params(dataset=str(CORPUS), max_samples=3, streaming=True), tmp_path / "s")
    assert streamed["train"].num_rows == 3


def nested(levels: int) -> dict:
    """A record `levels` containers deep, itself the first."""
    record: dict = {"text": "a record"}
    for _ in range(levels - 1):
        record = {"text": "a record", "meta": record}
    return record


def test_records_nest_as_deep_as_arrow_keeps_and_no_deeper(tmp_path):
    """JSON_DEPTH_MAX levels read; one more is one line naming the file and line before any library parses it,
    also where the record is spread over lines (pretty-printed JSON, counted across them)."""
    (tmp_path / "deepest.jsonl").write_text(json.dumps(nested(JSON_DEPTH_MAX)) + "\n")
    raw, _ = load_raw(data_params(dataset=str(tmp_path / "deepest.jsonl")), tmp_path / "a")
    assert raw["train"].num_rows == 1
    (tmp_path / "deeper.jsonl").write_text('{"text": "shallow"}\n' + json.dumps(nested(JSON_DEPTH_MAX + 1)) + "\n")
    (tmp_path / "pretty.json").write_text(json.dumps(nested(JSON_DEPTH_MAX + 1), indent=1))
    for name, line in (("deeper.jsonl", 2), ("pretty.json", 2 * JSON_DEPTH_MAX + 1)):
        with pytest.raises(PipelineError, match=rf"{name} line {line}: a record nests deeper than it can be read"):
            load_raw(data_params(dataset=str(tmp_path / name)), tmp_path / "b")
