"""The device and precision a stage runs on, chosen by measuring or asking, never assumed: CUDA when
present, bf16 only where the hardware runs it natively, an explicit choice the device cannot run an
error. The glibc setting that keeps the CPU path from page-faulting every step. And GPUs of its own for
each run where several run on one host (dvc queue start -j N)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError
from pipeline.core.workspace import try_flock

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPU runs bf16 matmuls natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS after every step.

    Each step allocates and frees the same large buffers (GPT-2's 50257-wide logits); by default glibc
    serves them with fresh mmaps, so every step page-faults hundreds of thousands of pages (what that
    cost, measured: docs/speed.md). The cost: the process keeps its peak memory until it exits. No-op
    off glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 2**31 - 1)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 2**30)


def resolve_precision(requested: str, key: str = "train.precision") -> str:
    """The precision to run: `auto` picks the fastest the device does natively; explicit requests the
    device cannot run are errors, never silent downgrades."""
    import torch

    if torch.cuda.is_available():
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            return "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            raise PipelineError(f"{key}=bf16 but this GPU (compute capability < 8.0) has no bf16; use fp16 or auto")
        return requested
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp16":
        raise PipelineError(f"{key}=fp16 needs a CUDA GPU and none is visible; use bf16 or fp32 (or auto) on CPU")
    if requested == "bf16" and not cpu_has_native_bf16():
        raise PipelineError(f"{key}=bf16 but this CPU has no native bf16 (AMX or AVX512-BF16) and would emulate it "
                            "slower than fp32; use fp32 or auto")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None: fp32, no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# --- one GPU per run: parallel experiments ----------------------------------------------------------

def gpu_lock_dir(env: dict[str, str]) -> Path:
    """The folder of the per-GPU locks: GPU_LOCK_DIR, else one in the temporary folder. It must be the
    same for every run on the host: the Makefile mounts the host's into each container at the same path."""
    return Path(env.get("GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "gpt2-pipeline-gpus")


def share_with_every_user(folder: Path) -> None:
    """Make `folder` one every user's runs can add lock files to, as /tmp is: world-writable with the
    sticky bit (the mode mkdir gives is cut by the umask). Only its owner can change it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PipelineError(f"cannot make the GPU lock folder {folder}: {e.strerror}; set GPU_LOCK_DIR to a "
                            "folder every run on this host can write to") from None
    if folder.stat().st_uid == os.geteuid() and folder.stat().st_mode & 0o7777 != 0o1777:
        folder.chmod(0o1777)


DEV = Path("/dev")


def visible_gpus() -> int:
    """The GPUs of this host (or container), counted from their device files: asking CUDA would fix
    this process's devices before CUDA_VISIBLE_DEVICES can choose them."""
    return sum(1 for p in DEV.glob("nvidia*") if p.name[len("nvidia"):].isdigit())


def claim_gpus(env: dict[str, str], want: int, devices: int, lock_dir: Path | None = None,
               wait_s: float = float("inf"), poll_s: float = 5.0) -> list[int]:
    """Give this stage `want` GPUs (train: NPROC_PER_NODE; evaluate, generate: 1) no other run of this
    pipeline on the host holds, by an flock on a file per GPU in gpu_lock_dir (every user's runs share
    it), held until this process (or the torchrun it starts, which inherits the files) ends, and set
    CUDA_VISIBLE_DEVICES to them: `dvc queue start -j N` then runs N experiments on N GPUs instead of N
    on GPU 0. Waits while they are taken (a queue with more workers than GPUs). Returns the GPUs
    claimed; none where there are no GPUs, or the user chose them (CUDA_VISIBLE_DEVICES, or
    GPU_SHARING=1 to let runs share)."""
    if devices == 0 or "CUDA_VISIBLE_DEVICES" in env or env.get("GPU_SHARING") == "1" or "LOCAL_RANK" in env:
        return []
    if want > devices:
        raise PipelineError(f"NPROC_PER_NODE={want} but this host has {devices} GPU(s); lower it")
    lock_dir = lock_dir or gpu_lock_dir(env)
    share_with_every_user(lock_dir)
    deadline, told = time.monotonic() + wait_s, False
    while True:
        held = []
        for gpu in range(devices):
            fd = lock_gpu(lock_dir / f"gpu-{gpu}.lock")
            if fd is not None:
                held.append((gpu, fd))
            if len(held) == want:
                break
        if len(held) == want:
            gpus = [gpu for gpu, _ in held]
            os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
            log.info("GPUs %s of %d claimed for this run (others held by runs beside it: %s)",
                     env["CUDA_VISIBLE_DEVICES"], devices, lock_dir)
            return gpus
        for _, fd in held:
            os.close(fd)
        if time.monotonic() >= deadline:
            raise PipelineError(f"no {want} free GPU(s) of {devices} within {wait_s:.0f} s: other runs hold them "
                                f"({lock_dir}); wait, lower NPROC_PER_NODE or dvc queue start -j, or set "
                                "GPU_SHARING=1 to share")
        if not told:
            log.info("waiting for %d free GPU(s): the others of %d are held by runs beside this one", want, devices)
            told = True
        time.sleep(poll_s)


def take_gpus(want: int) -> None:
    """A stage's device, decided before CUDA starts: `want` GPUs no other run holds (claim_gpus), then a stop
    in one line where the machine has GPUs this torch cannot use (refuse_a_cpu_run_on_a_gpu_host)."""
    env = dict(os.environ)
    claim_gpus(env, want, visible_gpus())
    refuse_a_cpu_run_on_a_gpu_host(env)


def lock_gpu(path: Path) -> int | None:
    """try_flock on a GPU's lock file, which every user's runs open."""
    try:
        return try_flock(path, all_users=True)  # inheritable: torchrun's workers keep it
    except PermissionError as e:
        raise PipelineError(f"cannot open the GPU lock {path}: {e.strerror}; another user made {path.parent} "
                            f"without write access for all: chmod 1777 {path.parent} (as its owner), or set "
                            "GPU_LOCK_DIR to a folder every run on this host shares") from None


# --- no silent CPU run on a GPU host ---------------------------------------------------------------

CPU_OPT_IN = "PIPELINE_ALLOW_CPU"
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor version compatibility): with
# an older one, torch.cuda.is_available() is simply false.
CUDA_MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def refuse_a_cpu_run_on_a_gpu_host(env: dict[str, str]) -> None:
    """Stop a stage that would run on the CPU of a machine with NVIDIA GPUs (days instead of hours),
    naming why CUDA does not see them and the fix. PIPELINE_ALLOW_CPU=1 asks for the CPU on purpose.
    Call it after claim_gpus: asking CUDA fixes this process's devices."""
    if env.get(CPU_OPT_IN) == "1":
        return
    gpus = visible_gpus()
    # The CUDA images set NVIDIA_VISIBLE_DEVICES; the container toolkit adds the devices only when asked
    container_without_gpus = gpus == 0 and env.get("NVIDIA_VISIBLE_DEVICES", "") not in ("", "void", "none")
    if gpus == 0 and not container_without_gpus:
        return  # a machine without GPUs: the CPU is all there is
    import torch

    if torch.cuda.is_available():
        return
    raise PipelineError(f"{why_cuda_sees_no_gpu(env, gpus, container_without_gpus)}; to run on the CPU instead (days, "
                        f"not hours), set {CPU_OPT_IN}=1")


def why_cuda_sees_no_gpu(env: dict[str, str], gpus: int, container_without_gpus: bool) -> str:
    """The cause, and its fix, of a torch that sees none of the machine's NVIDIA GPUs."""
    import torch

    if container_without_gpus:
        return ("this container was started without its GPUs (the CUDA image sets NVIDIA_VISIBLE_DEVICES, and "
                f"there is no {DEV}/nvidia0): start it with --gpus all (docker, "
                "NVIDIA Container Toolkit) or --device nvidia.com/gpu=all (podman, CDI), as make docker-train does")
    host = f"this host's {gpus} NVIDIA GPU(s)"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build and cannot use {host}: install the CUDA build (pip "
                f"install --force-reinstall --no-cache-dir torch=={torch.__version__.split('+')[0]}: PyPI's Linux "
                "x86_64 wheel), or run in the image (make docker-train)")
    hidden = env.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides {host}: unset it, or name the GPUs to use (e.g. 0,1)"
    driver, needs = nvidia_driver(), CUDA_MIN_DRIVER.get(int(torch.version.cuda.split(".")[0]))
    if driver and needs and int(driver.split(".")[0]) < needs:
        return (f"the NVIDIA driver is {driver}, and torch {torch.__version__} (CUDA {torch.version.cuda}) needs "
                f"{needs} or newer, so CUDA sees none of {host}: upgrade the host's driver to >= {needs}")
    return (f"CUDA does not start on {host} (torch {torch.__version__}, CUDA {torch.version.cuda}, driver "
            f"{driver or 'unknown'}): nvidia-smi says why")


def nvidia_driver() -> str | None:
    """The loaded NVIDIA kernel module's version (580.65.06), None where it cannot be read."""
    try:
        found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", NVIDIA_DRIVER.read_text().splitlines()[0] + " ")
    except (OSError, IndexError):
        return None
    return found.group(1) if found else None
