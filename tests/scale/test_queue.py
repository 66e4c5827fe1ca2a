"""Parallel experiments: two experiments queued with `dvc exp run --queue` and started together with
`dvc queue start -j 2` give the metrics the same two give run one after the other, each in a workspace
and with checkpoints of its own (neither resumes the other's). On a host with GPUs each would also take
a GPU of its own (pipeline.core.device.claim_gpus; tests/core/test_device.py)."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from pipeline.core.params import merge
from pipeline.tools.demo import commit_baseline, dvc, make_workspace, run
from tests.conftest import CORPUS, TINY

pytestmark = pytest.mark.scale
EXPERIMENTS = {"a": "lr=1e-3", "b": "lr=2e-3"}
TIMING = {"tokens_s", "mfu", "peak_gib", "train_min"}  # what two runs sharing 2 cores change


def summaries(workspace) -> dict[str, dict]:
    """experiment name -> its metrics/summary.json, for every experiment `dvc exp show --json` lists."""
    shown = json.loads(dvc(workspace, "exp", "show", "--json", capture=True).stdout)
    found = {}
    for commit in shown:
        for exp in [e for group in commit.get("experiments") or [] for e in group.get("revs", [])]:
            metrics = (exp.get("data") or {}).get("metrics", {}).get("metrics/summary.json", {}).get("data")
            if exp.get("name") and metrics:
                found[exp["name"]] = {k: v for k, v in metrics.items() if k not in TIMING}
    return found


def test_two_queued_experiments_at_once_give_the_metrics_of_two_in_turn(tmp_path):
    workspace = make_workspace(tmp_path / "ws", merge(TINY, {"train": {"max_steps": 6, "eval_steps": 3,
                                                                       "save_steps": 3}}))
    shutil.copytree(CORPUS, workspace / "data/input/corpus")
    run(["dvc", "repro", "-q"], workspace, capture=True)
    commit_baseline(workspace)
    # In turn in a copy of the workspace: run here, DVC's run-cache would restore the queued ones instead of
    # running them
    in_turn = tmp_path / "in-turn"
    shutil.copytree(workspace, in_turn, symlinks=True)
    for name, setting in EXPERIMENTS.items():
        dvc(in_turn, "exp", "run", "-q", "-n", f"turn-{name}", "-S", setting, capture=True)
    for name, setting in EXPERIMENTS.items():
        dvc(workspace, "exp", "run", "--queue", "-n", f"queued-{name}", "-S", setting, capture=True)
    started = time.monotonic()
    dvc(workspace, "queue", "start", "-j", "2", capture=True)
    while time.monotonic() - started < 600:
        status = dvc(workspace, "queue", "status", capture=True).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status
    print(f"two queued experiments at once: {time.monotonic() - started:.0f} s\n{status}")
    found = {**summaries(workspace), **summaries(in_turn)}
    for name in EXPERIMENTS:
        assert found[f"queued-{name}"] == found[f"turn-{name}"], name
    assert found["queued-a"] != found["queued-b"]  # two experiments, not one run shown twice
    spans = {}
    for name in EXPERIMENTS:
        logs = dvc(workspace, "queue", "logs", f"queued-{name}", capture=True).stdout
        assert "resuming from" not in logs and "training it again" not in logs  # its own, fresh checkpoints
        times = re.findall(r"^(\d\d:\d\d:\d\d) pipeline\.", logs, re.MULTILINE)
        spans[name] = (times[0], times[-1])
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert a_start <= b_end and b_start <= a_end, spans  # they ran at the same time, not one after the other
