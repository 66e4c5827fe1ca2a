"""pipeline/tools/compare.py on a real run: the pipeline through DVC on the tiny params, committed as the
baseline, then `dvc exp run -S lr=5e-4`; the report of the workspace against HEAD and of the experiment
against its baseline, read as a reviewer reads it (its tables against metrics/summary.json at each
revision, its images opened), and the bad inputs that must end as one line and write nothing."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.core.outputs import write_manifest
from pipeline.tools.compare import main
from tests.conftest import EXPERIMENT, TINY, in_process, run_stage

pytestmark = pytest.mark.e2e

LOWER_LR = 5e-4


@pytest.fixture(scope="module")
def workspace(experimented) -> Path:
    """The e2e run (tests/conftest.py): the baseline committed at HEAD, then experiment lower-lr (lr 5e-4),
    which DVC leaves applied in the workspace. The report goes to compare/, which the workspace git-ignores."""
    return experimented


@pytest.fixture(scope="module")
def report(workspace) -> Path:
    """`python -m pipeline.tools.compare` as a user runs it, over an earlier report."""
    (workspace / "compare").mkdir()
    (workspace / "compare/stale.png").write_bytes(b"an earlier report's image")
    (workspace / "compare/report.md").write_text("![stale](stale.png)\n")
    write_manifest(workspace / "compare")  # as the tool leaves a report
    ran = run_stage("tools.compare", cwd=workspace)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "compare/report.md"
    return workspace / "compare/report.md"


def git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, check=True, capture_output=True, text=True).stdout


def summary_at(workspace: Path, commit: str) -> dict:
    return json.loads(git(workspace, "show", f"{commit}:metrics/summary.json"))


def experiment_commit(workspace: Path) -> str:
    refs = git(workspace, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    return next(sha for sha, ref in (line.split() for line in refs) if ref.endswith(f"/{EXPERIMENT}"))


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Each `## section`'s table as rows keyed by its header."""
    found: dict[str, list[dict[str, str]]] = {}
    section, header = "", []
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, header = line[3:], []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header:
                found.setdefault(section, []).append(dict(zip(header, cells, strict=True)))
            else:
                header = cells
    return found


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a whole PNG: its signature, every chunk's CRC, and the image data inflating to
    exactly its rows (what a viewer decodes; PIL is not in the venv)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, (crc,) = data[pos + 8:pos + 8 + length], struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    assert interlace == 0
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + (width * channels * depth + 7) // 8)  # a filter byte, then each row
    return width, height


def assert_metrics_are_those_of(rows: list[dict[str, str]], old: str, new: str, before: dict, after: dict) -> None:
    assert {row["Metric"] for row in rows} == set(before) == set(after)
    for row in rows:
        key = row["Metric"]
        assert row["File"] == "metrics/summary.json"
        assert float(row[old]) == before[key] and float(row[new]) == after[key], row
        assert Decimal(row["Change"]) == Decimal(row[new]) - Decimal(row[old]), row  # of the numbers as printed
        assert float(row["Change"]) == pytest.approx(after[key] - before[key]), row


def test_help():
    ran = run_stage("tools.compare", "--help")
    assert ran.returncode == 0 and all(option in ran.stdout for option in ("--rev", "--exp", "--out"))


def test_the_params_table_has_lr_at_both_revisions(report, workspace):
    head = git(workspace, "rev-parse", "--short=7", "HEAD").strip()
    assert report.read_text().startswith(f"# workspace against HEAD ({head})\n")
    rows = tables(report.read_text())["Params"]
    assert [(row["File"], row["Param"]) for row in rows] == [("params.yaml", "lr")]  # only what differs
    assert float(rows[0]["HEAD"]) == TINY["lr"] and float(rows[0]["workspace"]) == LOWER_LR


def test_the_metrics_are_summary_json_at_each_revision_and_the_change_between(report, workspace):
    after = json.loads((workspace / "metrics/summary.json").read_text())
    assert_metrics_are_those_of(tables(report.read_text())["Metrics"], "HEAD", "workspace",
                                summary_at(workspace, "HEAD"), after)


def test_every_linked_image_is_a_png_beside_the_report(report):
    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"loss.png", "perplexity.png", "learning_rate.png", "doc_lengths.png"} <= set(links), links
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link
        width, height = png_size((report.parent / link).read_bytes())
        assert width >= 200 and height >= 100, (link, width, height)
    assert sorted(path.name for path in report.parent.glob("*.png")) == sorted(links)  # the old report is gone


def test_plots_without_data_are_left_out_in_one_line(report):
    text = report.read_text()
    assert "Left out, no data at HEAD or workspace: classifier, confusion." in text.splitlines()
    assert "classifier.png" not in text and "confusion.png" not in text


def test_an_experiment_against_its_baseline_commit(workspace, tmp_path):
    ran = in_process(main, ["--exp", EXPERIMENT, "--out", str(tmp_path / "exp")], workspace)
    assert ran.returncode == 0, ran.stderr[-3000:]
    text = (tmp_path / "exp/report.md").read_text()
    baseline = git(workspace, "rev-parse", "--short=7", "HEAD").strip()
    assert text.startswith(f"# {EXPERIMENT} against {baseline}\n")
    params = tables(text)["Params"]
    assert [(row["Param"], float(row[baseline]), float(row[EXPERIMENT])) for row in params] == [
        ("lr", TINY["lr"], LOWER_LR)]
    assert_metrics_are_those_of(tables(text)["Metrics"], baseline, EXPERIMENT, summary_at(workspace, "HEAD"),
                                summary_at(workspace, experiment_commit(workspace)))


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder but git's and DVC's own state, with its size and modification time."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*") if path.is_file() and path.relative_to(folder).parts[:1] != (".git",)
            and path.relative_to(folder).parts[:2] != (".dvc", "tmp")}


@pytest.mark.parametrize("args, problem, fix", [
    (["--rev", "no-such-branch"], "'no-such-branch' is not a branch, tag or commit", "git log"),
    (["--exp", "no-such-exp"], "'no-such-exp' is not an experiment", "dvc exp list"),
    (["--out", "params.yaml"], "params.yaml is a file, not a folder", "name a folder"),
    (["--out", "params.yaml/report"], "params.yaml is a file, not a folder", "name a folder"),
    (["--out", "."], "--out . holds files that are not an earlier report", "name a new folder"),
    (["--out", "data"], "--out data holds files that are not an earlier report", "name a new folder"),
    (["--out", "models/finetuned"], "not an earlier report (README.md", "name a new folder"),  # it has a manifest
], ids=["unknown revision", "unknown experiment", "out is a file", "out inside a file", "out is the workspace",
        "out is a folder of the user's", "out is a stage's output"])
def test_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, args, problem, fix):
    before = files(workspace)
    out = [] if "--out" in args else ["--out", str(tmp_path / "report")]
    ran = in_process(main, args + out, workspace)
    assert ran.returncode == 2 and len(ran.stderr.splitlines()) == 1, ran.stderr
    assert ran.stderr.startswith("error: ") and problem in ran.stderr and fix in ran.stderr, ran.stderr
    assert files(workspace) == before and not any(tmp_path.iterdir())


def test_a_folder_outside_a_dvc_repository_is_one_line_and_writes_nothing(tmp_path):
    ran = in_process(main, [], tmp_path)
    assert ran.returncode == 2 and len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "is not in a DVC repository" in ran.stderr and "run this in the pipeline's workspace" in ran.stderr
    assert not any(tmp_path.iterdir())
