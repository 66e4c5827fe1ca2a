"""Two runs in one workspace: while the train stage runs, a second train (or any stage) started there
says in one line that it is running and exits within seconds, and the first finishes unharmed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, prepare, write_params

pytestmark = pytest.mark.scale
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_second_stage_in_a_running_workspace_is_one_line(tmp_path, tokenizer_dir):
    root = prepare(tmp_path / "ws", tokenizer_dir, {})
    write_params(root, {"train": {"max_steps": 150, "save_steps": 50, "eval_steps": 50}})
    first = subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=root, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(root.glob("checkpoints/*/dvclive")) and time.monotonic() < deadline:
        time.sleep(0.05)  # training has begun
    for stage in ("train", "evaluate"):
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"python -m pipeline.train (pid {first.pid}) is running in this workspace" in \
            errors[0], errors
        assert time.monotonic() - started < 30
    assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert (root / "models/finetuned/model.safetensors").exists()
