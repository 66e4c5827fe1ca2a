"""pipeline/core/device.py's claim_gpus: runs beside each other on one host (dvc queue start -j N, two
containers, two users) each get GPUs no other run holds, wait while there are none, and let go of them when
they end. The GPUs are a count here (this machine has none); the locks are the real ones, held by other
processes. And the stages' refusal to run on the CPU of a machine whose GPUs torch cannot use."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.core import device
from pipeline.core.device import claim_gpus
from pipeline.core.errors import PipelineError
from tests.conftest import ROOT, in_process

HOLD = """
import fcntl, os, sys
from pathlib import Path
from pipeline.core.errors import PipelineError
from pipeline.core.device import claim_gpus
if len(sys.argv) > 4:  # another user's run, with a umask that keeps what it creates to itself
    os.setgid(int(sys.argv[4]))
    os.setuid(int(sys.argv[4]))
    os.umask(0o077)
try:
    print(claim_gpus({}, int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), wait_s=0), flush=True)
except PipelineError as e:
    print(repr(str(e)), flush=True)
sys.stdin.read()  # hold them until the test closes stdin
"""


def holder(lock_dir: Path, want: int, devices: int, uid: int | None = None) -> tuple[subprocess.Popen, list[int] | str]:
    """Another run: a process that claims `want` of `devices` GPUs and holds them (as user `uid`: it
    becomes that user once its interpreter started, which may live where only root can read). Returns
    it and the GPUs it claimed, or its one-line error."""
    as_user = [str(uid)] if uid is not None else []
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(want), str(devices), str(lock_dir), *as_user],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    claimed = process.stdout.readline()
    assert claimed, "the other run failed to claim (its traceback is above)"
    return process, eval(claimed)  # noqa: S307 - our own child's printed list or message


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


@pytest.mark.skipif(os.getuid() != 0, reason="runs processes as other users: needs root")
def test_runs_of_different_users_get_gpus_of_their_own():
    """Two users' runs on one host (or two containers run as their callers' uids, the folder mounted into
    both): whoever comes first makes the folder and its lock files, and the other still takes part."""
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:  # not tmp_path: its parents are root's alone
        os.chmod(scratch, 0o1777)  # as /tmp is
        lock_dir = Path(scratch) / "gpus"
        first, theirs = holder(lock_dir, 1, 2, uid=1234)
        second, ours = holder(lock_dir, 1, 2, uid=1235)
        assert (theirs, ours) == ([0], [1])
        with pytest.raises(PipelineError, match=r"no 1 free GPU\(s\) of 2"):
            claim_gpus({}, 1, 2, lock_dir, wait_s=0)
        for process in first, second:
            process.stdin.close()
            process.wait(timeout=30)


def test_the_lock_folder_is_gpu_lock_dir_shared_by_every_user(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_LOCK_DIR", str(tmp_path / "gpus"))
    umask = os.umask(0o077)  # one that would keep the folder and the files to this user
    try:
        assert claim_gpus(dict(os.environ), 1, 2, wait_s=0) == [0]
    finally:
        os.umask(umask)
    assert oct((tmp_path / "gpus").stat().st_mode & 0o7777) == "0o1777"  # sticky and world-writable, as /tmp
    assert oct((tmp_path / "gpus/gpu-0.lock").stat().st_mode & 0o777) == "0o666"


@pytest.mark.skipif(os.getuid() != 0, reason="runs processes as other users: needs root")
def test_a_lock_folder_other_users_cannot_write_to_is_one_line():
    with tempfile.TemporaryDirectory(dir="/tmp") as lock_dir:  # root's, 0755: no lock file of another user's
        os.chmod(lock_dir, 0o755)
        process, message = holder(Path(lock_dir), 1, 1, uid=1234)
        process.stdin.close()
        process.wait(timeout=30)
    assert isinstance(message, str) and "chmod 1777" in message and "GPU_LOCK_DIR" in message, message


# --- no silent CPU run on a GPU host --------------------------------------------------------------

STAGES = {"train": "pipeline.train", "evaluate": "pipeline.evaluate", "generate": "pipeline.generate"}


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """This machine as the stages see a host with two NVIDIA GPUs that torch cannot use: a /dev that
    lists them, a CPU build of torch (whichever build this is), locks of their own, no opt-in to the CPU."""
    monkeypatch.setattr("torch.version.cuda", None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    monkeypatch.setattr(device, "DEV", dev, raising=False)
    monkeypatch.setattr(device, "NVIDIA_DRIVER", tmp_path / "no-driver-version", raising=False)
    monkeypatch.setenv("GPU_LOCK_DIR", str(tmp_path / "gpus"))
    for name in ("PIPELINE_ALLOW_CPU", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return dev


def stage_main(stage: str):
    return importlib.import_module(STAGES[stage]).main


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_on_a_gpu_host_without_cuda_stops_in_one_line(gpu_host, project, stage):
    result = in_process(stage_main(stage), [], project)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "2 NVIDIA GPU(s)" in lines[0] and "CPU build" in lines[0] and "PIPELINE_ALLOW_CPU=1" in lines[0], lines


@pytest.mark.parametrize("stage", STAGES)
def test_asked_for_the_cpu_the_stages_run_on_a_gpu_host(gpu_host, project, stage, monkeypatch):
    """With the opt-in the stage goes on past the device check: in a project where nothing ran yet, to
    the check of its inputs (training for real is the rest of the suite, which runs with the opt-in)."""
    monkeypatch.setenv("PIPELINE_ALLOW_CPU", "1")
    result = in_process(stage_main(stage), [], project)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert any(f"run the {before} stage first" in lines[0] for before in ("download", "preprocess", "train")), lines
    assert "NVIDIA" not in lines[0]


@pytest.mark.parametrize("env, cuda, driver, said", [
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, "13.0", None,
     ["started without its GPUs", "--gpus all", "--device nvidia.com/gpu=all"]),
    ({}, "13.0", "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024",
     ["driver is 550.54.14", "CUDA 13.0", "needs 580 or newer"]),
    ({}, "13.0", "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build",
     ["CUDA does not start", "driver 580.65.06", "nvidia-smi"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, "13.0", None, ["CUDA_VISIBLE_DEVICES='' hides"]),
    ({}, None, None, ["CPU build"]),
])
def test_why_cuda_does_not_see_the_gpus_is_named_with_its_fix(gpu_host, tmp_path, monkeypatch, env, cuda, driver,
                                                                said):
    if "NVIDIA_VISIBLE_DEVICES" in env:  # a container run without the GPU flags: the image's variable, no devices
        for gpu in gpu_host.iterdir():
            gpu.unlink()
    if driver:
        (tmp_path / "no-driver-version").write_text(driver + "\nGCC version: gcc version 12.3.0\n")
    monkeypatch.setattr("torch.version.cuda", cuda)
    with pytest.raises(PipelineError) as refused:
        device.refuse_a_cpu_run_on_a_gpu_host(env)
    message = str(refused.value)
    assert all(words in message for words in said) and message.endswith("set PIPELINE_ALLOW_CPU=1"), message
    device.refuse_a_cpu_run_on_a_gpu_host({**env, "PIPELINE_ALLOW_CPU": "1"})  # asked for: no refusal


def test_a_machine_without_gpus_runs_on_the_cpu_as_ever(gpu_host):
    for gpu in gpu_host.iterdir():
        gpu.unlink()
    device.refuse_a_cpu_run_on_a_gpu_host({})
    device.refuse_a_cpu_run_on_a_gpu_host({"NVIDIA_VISIBLE_DEVICES": "void"})
