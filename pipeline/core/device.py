"""The device and precision a stage runs on, chosen by measuring or asking, never assumed: CUDA when
present, bf16 only where the hardware runs it natively, an explicit choice the device cannot run an
error. The glibc setting that keeps the CPU path from page-faulting every step. And GPUs of its own for
each run where several run on one host (dvc queue start -j N)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.common import PipelineError, try_flock

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

GPU_LOCKS = Path(tempfile.gettempdir()) / "gpt2-pipeline-gpus"  # host-wide: every queue worker sees it


def visible_gpus() -> int:
    """The GPUs of this host (or container), counted from their device files: asking CUDA would fix
    this process's devices before CUDA_VISIBLE_DEVICES can choose them."""
    return sum(1 for p in Path("/dev").glob("nvidia*") if p.name[len("nvidia"):].isdigit())


def claim_gpus(env: dict[str, str], want: int, devices: int, lock_dir: Path = GPU_LOCKS,
               wait_s: float = float("inf"), poll_s: float = 5.0) -> list[int]:
    """Give this stage `want` GPUs (train: NPROC_PER_NODE; evaluate, generate: 1) no other run of this
    pipeline on the host holds, by an flock on
    a file per GPU, held until this process (or the torchrun it starts, which inherits the files) ends,
    and set CUDA_VISIBLE_DEVICES to them: `dvc queue start -j N` then runs N experiments on N GPUs
    instead of N on GPU 0. Waits while they are taken (a queue with more workers than GPUs). Returns
    the GPUs claimed; none where there are no GPUs, or the user chose them (CUDA_VISIBLE_DEVICES,
    or GPU_SHARING=1 to let runs share)."""
    if devices == 0 or "CUDA_VISIBLE_DEVICES" in env or env.get("GPU_SHARING") == "1" or "LOCAL_RANK" in env:
        return []
    if want > devices:
        raise PipelineError(f"NPROC_PER_NODE={want} but this host has {devices} GPU(s); lower it")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline, told = time.monotonic() + wait_s, False
    while True:
        held = []
        for gpu in range(devices):
            fd = try_flock(lock_dir / f"gpu-{gpu}.lock")  # inheritable: torchrun's workers keep it
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
