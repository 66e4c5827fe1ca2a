"""Where raw text comes from, for the download stage: the Hugging Face Hub (id, config, revision
resolved to one commit first; HF_TOKEN for private datasets: pipeline.data.hub), local files (a file,
directory or glob of .txt, .jsonl/.json, .csv/.tsv, .parquet), or an http(s) URL of a text or JSONL
file checked against `data.sha256`. Optionally streamed (rows written to disk as they arrive) and
cut to `data.max_samples` per split. Local text that is not UTF-8 stops with the file and byte
offset, unless `data.encoding_errors` says to replace or drop the bad bytes."""

from __future__ import annotations

import glob
import hashlib
import logging
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import DataConfig
from pipeline.core.errors import PipelineError
from pipeline.core.locations import INPUTS, LOCAL_BUILDERS, is_local, is_url
from pipeline.data.hub import hub_call, resolve

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

log = logging.getLogger(__name__)
TEXT_SUFFIXES = {".txt", ".jsonl", ".json", ".csv", ".tsv"}  # read as UTF-8 text


# --- files -----------------------------------------------------------------------------------------

def suffix(path: Path) -> str:
    """A data file's kind by its extension, matched case-insensitively (CORPUS.TXT is a .txt file)."""
    return path.suffix.lower()


def local_files(pattern: str, inputs: Path | None = None) -> list[Path]:
    """The files a local file, directory or glob names; one type, known to the loader. A name that exists
    is taken literally (a file called "notes[1].txt" is that file, not a pattern); only a name that does
    not is expanded as a glob. With `inputs` (data/input), a file that resolves outside it (a symlink
    out) is refused: DVC tracks data/input, not where its links point."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and suffix(p) in LOCAL_BUILDERS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise PipelineError(f"data.dataset: no data files at {pattern!r}; give an existing file, directory or glob "
                            f"of {', '.join(LOCAL_BUILDERS)} files")
    if inputs is not None:
        root = inputs.resolve()
        outside = next((f for f in files if not f.resolve().is_relative_to(root)), None)
        if outside is not None:
            raise PipelineError(f"data.dataset: {outside} resolves to {outside.resolve()}, outside {inputs}/, which "
                                "DVC tracks; copy the file into it instead of linking")
    kinds = {(LOCAL_BUILDERS.get(suffix(f)), suffix(f) == ".tsv") for f in files}
    if (None, False) in kinds or len(kinds) > 1:
        raise PipelineError(f"data.dataset: {pattern!r} mixes or contains unsupported file types "
                            f"({', '.join(sorted({suffix(f) or '(none)' for f in files}))}); use one of "
                            f"{', '.join(LOCAL_BUILDERS)}")
    non_empty = [f for f in files if f.stat().st_size > 0]  # an empty file holds no records (and stops json's reader)
    if not non_empty:
        raise PipelineError(f"data.dataset: {files[0] if len(files) == 1 else f'every file at {pattern!r}'} is empty; "
                            "put text in it")
    if len(non_empty) < len(files):
        log.info("data.dataset: skipping %d empty file(s), e.g. %s", len(files) - len(non_empty),
                 next(f for f in files if f not in non_empty))
    return non_empty


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_bad_byte(path: Path) -> tuple[int, int] | None:
    """(offset, byte) of the first byte that is not valid UTF-8, or None. Reads 64 MB at a time."""
    offset, partial = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 26):
            buffer = partial + chunk
            try:
                buffer.decode("utf-8")
                partial = b""
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and len(buffer) - e.start < 4:
                    partial = buffer[e.start:]  # a character split across reads: finish it with the next one
                    buffer = buffer[:e.start]
                else:
                    return offset + e.start, buffer[e.start]
            offset += len(buffer)
    return (offset, partial[0]) if partial else None


def utf8_files(files: list[Path], errors: str, scratch: Path) -> list[Path]:
    """The files ready to read as UTF-8: checked (strict) or repaired into `scratch`."""
    # not datasets' encoding_errors: json ignores it (bad bytes reach Arrow); text and csv give no offset in the file
    ready = []
    for path in files:
        if suffix(path) not in TEXT_SUFFIXES:
            ready.append(path)
            continue
        bad = first_bad_byte(path)
        if bad is None:
            ready.append(path)
        elif errors == "strict":
            raise PipelineError(f"data.dataset: {path} is not UTF-8: byte 0x{bad[1]:02x} at offset {bad[0]}; "
                                "convert it (e.g. iconv -f latin1 -t utf-8), or set data.encoding_errors: replace")
        else:
            fixed = scratch / "utf8" / f"{len(ready)}-{path.name}"
            fixed.parent.mkdir(parents=True, exist_ok=True)
            fixed.write_bytes(path.read_bytes().decode("utf-8", errors=errors).encode("utf-8"))
            ready.append(fixed)
    return ready


JSON_DEPTH_MAX = 63  # the nesting datasets keeps: Arrow reads schemas at most 64 levels deep, the table's one of them
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # never spans lines: JSON escapes newlines in strings
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")


def check_nesting(files: list[Path], source: str | None = None) -> None:
    """Refuse a JSON record nested deeper than Arrow keeps before any library parses it: pyarrow's JSON
    reader recurses once per level and crashes the process (SIGSEGV, no message) some ten thousand levels
    down; shallower, datasets fails in words of its own. `source`: the file's name in the error (a URL)."""
    for path in files:
        if LOCAL_BUILDERS.get(suffix(path)) != "json":
            continue
        depth = 0  # containers still open at the end of the lines read: a record may span lines
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                opens = line.count(b"{") + line.count(b"[")
                if depth == 0 and opens <= JSON_DEPTH_MAX and opens == line.count(b"}") + line.count(b"]"):
                    continue  # a JSON Lines record, no deeper than its brackets (those in strings only add)
                deepest, depth = nesting(line, depth)
                if deepest > JSON_DEPTH_MAX:
                    raise PipelineError(f"data.dataset: {source or path} line {number}: a record nests deeper than it "
                                        f"can be read (over {JSON_DEPTH_MAX} levels, what Arrow keeps); flatten the "
                                        "records to the fields the text comes from")


def nesting(line: bytes, depth: int) -> tuple[int, int]:
    """The deepest level a line of JSON reaches, starting `depth` containers deep (counted past
    JSON_DEPTH_MAX no further), and the level it ends at."""
    deepest = depth
    for bracket in JSON_STRING.sub(b"", line).translate(None, NOT_BRACKETS):
        depth += 1 if bracket in b"{[" else -1
        deepest = max(deepest, depth)
        if deepest > JSON_DEPTH_MAX:
            break
    return deepest, max(depth, 0)  # below 0: stray closers, which the reader reports itself


def fetch_url(url: str, sha256: str | None, scratch: Path) -> tuple[Path, str]:
    """Download `url` into `scratch`; check it against `sha256`. Returns the file and its digest."""
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    if Path(name).suffix not in (".txt", ".jsonl"):
        raise PipelineError(f"data.dataset: {url} should name a .txt or .jsonl file; download other formats and "
                            "point data.dataset at the local file")
    target = scratch / "url" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "gpt2-finetune-pipeline"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f)
    except urllib.error.HTTPError as e:
        raise PipelineError(f"data.dataset: {url} answered HTTP {e.code} ({e.reason}); check the URL") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"data.dataset: cannot download {url} ({reason}); check the URL and the network") from None
    digest = file_sha256(target)
    if sha256 and digest != sha256.lower():
        raise PipelineError(f"data.sha256: {url} has SHA-256 {digest}, not the expected {sha256}; the file changed "
                            "or was corrupted: check it, then update data.sha256")
    return target, digest


# --- datasets --------------------------------------------------------------------------------------

def _load_files(files: list[Path], cfg: DataConfig) -> tuple[DatasetDict | IterableDatasetDict, str]:
    import datasets

    builder = LOCAL_BUILDERS[suffix(files[0])]
    extra: dict[str, Any] = {}
    if builder == "text":
        extra["sample_by"] = cfg.txt_sample_by
    if builder == "csv":  # a cell reading NA, null, None or n/a is that text, not a missing value
        extra["keep_default_na"] = False
    if suffix(files[0]) == ".tsv":
        extra["sep"] = "\t"
    try:
        # escaped: datasets expands data_files as glob patterns, and notes[1].txt would match notes1.txt
        raw = datasets.load_dataset(builder, data_files={"train": [glob.escape(str(f)) for f in files]},
                                    streaming=cfg.streaming, **extra)
    except RecursionError:
        raise PipelineError(f"data.dataset: a record of {cfg.dataset!r} nests deeper than it can be read (thousands of "
                            "levels); flatten the records to the fields the text comes from") from None
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError, ValueError) as e:
        cause = e.__cause__ or e
        raise PipelineError(f"data.dataset: could not read {cfg.dataset!r} as {builder}: "
                            f"{str(cause).strip().splitlines()[0]}; fix or remove the bad file") from None
    return raw, builder


def _materialise(stream: IterableDataset, max_samples: int | None, scratch: Path) -> Dataset:
    """A streamed split written to an Arrow file batch by batch (never whole in memory)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    path = scratch / f"stream-{len(list(scratch.glob('stream-*')))}.arrow"
    if max_samples:
        stream = stream.take(max_samples)
    # 1000 rows at a time: Dataset.from_generator takes the stream row by row, encoding each one through a builder
    with ArrowWriter(path=str(path), features=stream.features) as writer:
        for batch in stream.iter(batch_size=1000):
            writer.write_batch(batch)
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def load_raw(cfg: DataConfig, scratch: Path) -> tuple[DatasetDict, dict]:
    """The raw DatasetDict and what it came from. Temporary files go to `scratch`."""
    import datasets

    source: dict[str, Any]
    if is_url(cfg.dataset):
        path, digest = fetch_url(cfg.dataset, cfg.sha256, scratch)
        check_nesting([path], cfg.dataset)
        raw, builder = _load_files(utf8_files([path], cfg.encoding_errors, scratch), cfg)
        source = {"url": cfg.dataset, "sha256": digest, "format": builder}
    elif is_local(cfg.dataset):
        within = Path(cfg.dataset).parts[:len(INPUTS.parts)] == INPUTS.parts  # as the params require
        files = local_files(cfg.dataset, INPUTS if within else None)
        check_nesting(files)
        raw, builder = _load_files(utf8_files(files, cfg.encoding_errors, scratch), cfg)
        source = {"files": {str(f): file_sha256(f) for f in files}, "format": builder}
    else:
        commit = resolve(cfg.dataset, cfg.revision, "dataset", "data.dataset")
        raw = hub_dataset(cfg, commit)
        source = {"resolved_commit": commit, "format": "hub"}
    if cfg.train_split not in raw:
        raise PipelineError(f"data.train_split: {cfg.train_split!r} is not a split of {cfg.dataset!r}; "
                            f"it has {', '.join(raw)}")
    if cfg.streaming:
        raw = datasets.DatasetDict({name: _materialise(split, cfg.max_samples, scratch) for name, split in raw.items()})
    elif cfg.max_samples:
        raw = datasets.DatasetDict({name: split.select(range(min(cfg.max_samples, len(split))))
                                    for name, split in raw.items()})
    provenance = {"dataset": cfg.dataset, "config": cfg.config, "revision": cfg.revision, **source,
                  "streaming": cfg.streaming, "max_samples": cfg.max_samples,
                  "splits": {name: split.num_rows for name, split in raw.items()}, "datasets": datasets.__version__}
    return raw, provenance


def hub_dataset(cfg: DataConfig, commit: str) -> DatasetDict | IterableDatasetDict:
    """A Hub dataset (config `cfg.config`) at `commit`, every file from that one commit."""
    import datasets
    from huggingface_hub import constants

    what = f"dataset {cfg.dataset!r} at commit {commit}"
    try:
        raw = hub_call(lambda: datasets.load_dataset(cfg.dataset, cfg.config, revision=commit,
                                                     streaming=cfg.streaming), what, "data.dataset")
    except ValueError as e:  # datasets: an unknown config, or none given where the dataset has several
        first = " ".join(str(e).split())
        raise PipelineError(f"data.config: {first[:300]}; set data.config to one of them") from None
    except FileNotFoundError as e:  # datasets: no data files for the config, or a file the card names is gone
        raise PipelineError(f"data.dataset: {what} has no data files it can read ({e}); check data.config "
                            "and the repo") from None
    if constants.HF_HUB_OFFLINE and not cfg.streaming:
        check_cached_commit(raw, commit, cfg)
    return raw


def check_cached_commit(raw: DatasetDict, commit: str, cfg: DataConfig) -> None:
    """Offline, datasets serves "the latest cached version" of a Hub dataset whatever the revision: its
    cache folder names the commit it holds, which must be the one the revision resolved to."""
    for split in raw.values():
        for cache_file in split.cache_files:
            cached = re.search(r"/([0-9a-f]{40})/", cache_file["filename"])
            if cached and cached.group(1) != commit:
                raise PipelineError(f"data.revision: offline, the cache holds {cfg.dataset!r} at commit "
                                    f"{cached.group(1)}, not {commit} ({cfg.revision or 'main'}); run download once "
                                    "with the Hub reachable (unset HF_HUB_OFFLINE)")
