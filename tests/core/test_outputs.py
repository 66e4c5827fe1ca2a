"""pipeline/core/outputs.py and the stage wrapper: a stage's outputs land whole and together, or not at all."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import outputs


def make_old(root: Path) -> dict[str, int]:
    """A stage's outputs from an earlier run: a directory and a file; their inodes."""
    (root / "model").mkdir(parents=True)
    (root / "model/weights").write_text("old")
    (root / "metrics").mkdir()
    (root / "metrics/m.json").write_text("old")
    return inodes(root)


def inodes(root: Path) -> dict[str, int]:
    return {name: (root / name).stat().st_ino for name in ("model", "metrics/m.json") if (root / name).exists()}


def state(root: Path, old: dict[str, int]) -> list[str]:
    """Each output as 'old', 'new' or 'absent' (read back, so a half-written one shows)."""
    found = []
    for name in ("model", "metrics/m.json"):
        path = root / name
        if not path.exists():
            found.append("absent")
        elif path.stat().st_ino == old[name]:
            found.append("old")
        else:
            text = (path / "weights").read_text() if path.is_dir() else path.read_text()
            found.append("new" if text == "new" else f"broken: {text!r}")
    return found


def write_new(model: Path, metrics: Path) -> None:
    model.mkdir()
    (model / "weights").write_text("new")
    metrics.write_text("new")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def test_the_outputs_land_together(tmp_path):
    old = make_old(tmp_path)
    with outputs(tmp_path / "model", tmp_path / "metrics/m.json") as (model, metrics):
        write_new(model, metrics)
        assert state(tmp_path, old) == ["old", "old"]  # nothing in place before the stage has finished
    assert state(tmp_path, old) == ["new", "new"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("stop", [PipelineError("bad value"), KeyboardInterrupt(), OSError(errno.ENOSPC, "full")])
def test_a_stage_that_stops_changes_nothing(tmp_path, stop):
    old = make_old(tmp_path)
    with pytest.raises(type(stop)), outputs(tmp_path / "model", tmp_path / "metrics/m.json") as (model, metrics):
        write_new(model, metrics)
        raise stop
    assert state(tmp_path, old) == ["old", "old"] and leftovers(tmp_path) == []


def test_an_output_the_stage_did_not_write_is_a_bug_and_changes_nothing(tmp_path):
    old = make_old(tmp_path)
    with pytest.raises(RuntimeError, match="did not write its output .*m.json"):
        with outputs(tmp_path / "model", tmp_path / "metrics/m.json") as (model, _):
            model.mkdir()
    assert state(tmp_path, old) == ["old", "old"] and leftovers(tmp_path) == []


KILLED_AT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pipeline.core.outputs import outputs
    root, after = Path(sys.argv[1]), int(sys.argv[2])
    real, done = os.replace, []
    def replace(a, b):  # SIGKILL-like: the process vanishes after `after` renames of the landing
        if ".tmp-" in str(b):  # a file written whole inside a stand-in (its manifest): not the landing
            return real(a, b)
        if len(done) == after:
            os._exit(9)
        done.append(b)
        real(a, b)
    os.replace = replace
    with outputs(root / "model", root / "metrics/m.json") as (model, metrics):
        model.mkdir(); (model / "weights").write_text("new"); metrics.write_text("new")
""")


@pytest.mark.parametrize("after", range(6))
def test_killed_while_landing_the_next_run_finishes_the_landing_first(tmp_path, after):
    """Killed after each rename (the journal's own, then old outputs moved aside and stand-ins moved in):
    a reader may find an output absent for an instant, never a new one beside an old one once the next
    run of the stage has started."""
    old = make_old(tmp_path)
    done = subprocess.run([sys.executable, "-c", KILLED_AT, str(tmp_path), str(after)],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}, capture_output=True)
    assert done.returncode in (0, 9), done.stderr.decode()
    with pytest.raises(KeyboardInterrupt), outputs(tmp_path / "model", tmp_path / "metrics/m.json"):
        landed = state(tmp_path, old)  # after recovery, before this run writes anything
        raise KeyboardInterrupt  # this run stops too: its own stand-ins never existed
    assert landed in (["old", "old"], ["new", "new"]), landed
    assert landed == (["old", "old"] if after == 0 else ["new", "new"])  # the journal decides
    assert leftovers(tmp_path) == []


def test_sigterm_while_landing_waits_until_the_outputs_are_in_place(tmp_path, monkeypatch):
    old = make_old(tmp_path)
    real = os.replace

    def replace(a, b):
        if ".tmp-" not in str(b):  # a rename of the landing, not a file written inside a stand-in
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the renames
        real(a, b)

    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(state(tmp_path, old)))
    done = threading.Event()
    other = threading.Thread(target=done.wait)  # torch and datasets run threads: a signal may reach one of them
    other.start()
    try:
        monkeypatch.setattr(os, "replace", replace)
        with outputs(tmp_path / "model", tmp_path / "metrics/m.json") as (model, metrics):
            write_new(model, metrics)
    finally:
        signal.signal(signal.SIGTERM, previous)
        done.set()
        other.join()
    assert stopped == [["new", "new"]]  # handled once, after the last rename


@stage_command
def disk_full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/data/models/.finetuned.tmp-1234/model.safetensors")


@stage_command
def long_error() -> None:
    raise PipelineError("params: data.template " + "x" * 5000 + " has no fields; add {column} names")


def test_a_full_disk_is_one_line_naming_the_file_and_the_fix():
    result = CliRunner().invoke(disk_full, [])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: /data/models/.finetuned.tmp-1234/model.safetensors: No space left on "
                                     "device; free disk space and run again (no output was changed)")


def test_a_long_error_is_cut_in_the_middle_keeping_the_fix():
    result = CliRunner().invoke(long_error, [])
    line = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in line and len(line) <= 400
    assert line.startswith("error: params: data.template xxx") and line.endswith("has no fields; add {column} names")


SIGTERMED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.core.cli import stage_command
    from pipeline.core.outputs import outputs

    @stage_command
    def stage():
        with outputs(Path(sys.argv[1]) / "out.json") as (out,):
            out.write_text("half")
            print("writing", flush=True)
            time.sleep(60)

    stage([])
""")


def test_sigterm_stops_a_stage_with_a_message_and_nothing_half_written(tmp_path):
    (tmp_path / "out.json").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: no output is half-written; run it again")
    assert "Traceback" not in stderr
    assert (tmp_path / "out.json").read_text() == "old" and leftovers(tmp_path) == []


def test_a_folder_is_never_swapped_for_a_file_nor_a_file_used_as_a_folder(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/kept.json").write_text("{}")
    with pytest.raises(PipelineError, match="metrics is a folder, and the stage writes a file there"):
        with outputs(tmp_path / "metrics") as (summary,):
            summary.write_text("{}")
    with pytest.raises(PipelineError, match="kept.json is a file, not a folder; choose another output path"):
        with outputs(tmp_path / "metrics/kept.json/summary.json"):
            pass
    assert [p.name for p in tmp_path.rglob("*")] == ["metrics", "kept.json"]
