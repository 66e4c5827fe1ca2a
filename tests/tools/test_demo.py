"""pipeline/tools/demo.py around the run itself (the run: tests/test_e2e.py and CI's make docker-check):
one demo per workdir at a time, and a workdir holding the user's experiments moved aside, not deleted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.tools.demo import keep_aside, main
from tests.conftest import ROOT, in_process

HOLD = """
import sys
from pipeline.core.workspace import hold_workspace
hold_workspace("make demo (.demo)", lock=sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def git(workdir, *args: str) -> None:
    subprocess.run(["git", "-C", str(workdir), *args], check=True, capture_output=True)


def demo_like(workdir, commits: int):
    workdir.mkdir()
    git(workdir, "init", "-q")
    for i in range(commits):
        (workdir / "file").write_text(str(i))
        git(workdir, "add", "-A")
        git(workdir, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"c{i}")
    return workdir


def test_a_demo_workspace_with_the_users_experiments_is_moved_aside(tmp_path):
    assert keep_aside(demo_like(tmp_path / "plain", 2)) is None and (tmp_path / "plain").is_dir()  # the demo's own
    experimented = demo_like(tmp_path / ".demo", 2)
    git(experimented, "update-ref", "refs/exps/ab/cd/exp-1", "HEAD")  # what dvc exp run leaves
    kept = keep_aside(experimented)
    assert kept is not None and kept.name.startswith(".demo.kept-") and (kept / "file").read_text() == "1"
    assert not experimented.exists()
    assert keep_aside(demo_like(tmp_path / "more", 3)).name.startswith("more.kept-")  # a commit of the user's


def test_a_second_demo_in_the_same_workdir_is_one_line_and_touches_nothing(tmp_path):
    workdir = demo_like(tmp_path / ".demo", 2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, f"{workdir}.lock"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = in_process(main, ["--workdir", str(workdir)], tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "make demo (.demo) (pid " in errors[0] and "is running" in errors[0], errors
        assert (workdir / "file").read_text() == "1"  # the running demo's workspace is left alone
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize("name", [".pipeline.lock", ".demo.lock"])
def test_the_locks_are_not_committed(name):
    ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
    assert ignored.returncode == 0
