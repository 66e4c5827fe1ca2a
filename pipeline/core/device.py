"""The device and precision a stage runs on, chosen by measuring or asking, never assumed: CUDA when
present, bf16 only where the hardware runs it natively, an explicit choice the device cannot run an
error. And the glibc setting that keeps the CPU path from page-faulting every step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.common import PipelineError

if TYPE_CHECKING:
    import torch


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
