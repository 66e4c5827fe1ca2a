"""pipeline/core/device.py's claim_gpus: runs beside each other on one host (dvc queue start -j N) each
get GPUs no other run holds, wait while there are none, and let go of them when they end. The GPUs are a
count here (this machine has none); the locks are the real ones, held by other processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.common import PipelineError
from pipeline.core.device import claim_gpus
from tests.conftest import ROOT

HOLD = """
import sys
from pathlib import Path
from pipeline.core.device import claim_gpus
print(claim_gpus({}, int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), wait_s=0), flush=True)
sys.stdin.read()  # hold them until the test closes stdin
"""


def holder(lock_dir: Path, want: int, devices: int) -> tuple[subprocess.Popen, list[int]]:
    """Another run: a process that claims `want` of `devices` GPUs and holds them."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(want), str(devices), str(lock_dir)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return process, eval(process.stdout.readline())  # noqa: S307 - our own child's printed list


@pytest.fixture(autouse=True)
def own_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GPU_SHARING", raising=False)
    yield
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # claim_gpus set it for this process


def test_runs_beside_each_other_get_gpus_of_their_own(tmp_path):
    other, theirs = holder(tmp_path, 2, 3)
    assert theirs == [0, 1]
    with pytest.raises(PipelineError, match=r"no 2 free GPU\(s\) of 3 .* GPU_SHARING=1"):
        claim_gpus({}, 2, 3, tmp_path, wait_s=0)
    env: dict[str, str] = {}
    assert claim_gpus(env, 1, 3, tmp_path, wait_s=0) == [2] and env["CUDA_VISIBLE_DEVICES"] == "2"
    other.stdin.close()
    other.wait(timeout=30)
    assert claim_gpus({}, 2, 3, tmp_path, wait_s=0) == [0, 1]  # its end let go of them


def test_a_run_waits_for_a_gpu_to_come_free(tmp_path):
    other, theirs = holder(tmp_path, 1, 1)
    assert theirs == [0]
    threading.Timer(0.5, other.stdin.close).start()  # the other run ends half a second from now
    started = time.monotonic()
    assert claim_gpus({}, 1, 1, tmp_path, wait_s=60, poll_s=0.05) == [0]
    assert 0.4 < time.monotonic() - started < 30


@pytest.mark.parametrize("env, want, devices", [({"CUDA_VISIBLE_DEVICES": "3"}, 1, 4), ({"GPU_SHARING": "1"}, 1, 4),
                                                ({}, 1, 0), ({"LOCAL_RANK": "0"}, 1, 4)])
def test_no_claim_where_the_user_chose_there_are_no_gpus_or_torchrun_did(tmp_path, env, want, devices):
    assert claim_gpus(dict(env), want, devices, tmp_path, wait_s=0) == []
    assert not list(tmp_path.iterdir())


def test_more_processes_than_gpus_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match="NPROC_PER_NODE=4 but this host has 2 GPU"):
        claim_gpus({}, 4, 2, tmp_path)
