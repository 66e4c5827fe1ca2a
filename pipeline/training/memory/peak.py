"""The peak memory a run actually reached: the CUDA allocator's peak, or on a CPU the process's peak
resident memory, counted from the start of training (reset_peak); and PeakTensorMemory, which counts
live tensor storage on any device the way torch.cuda.max_memory_allocated does (for calibration and
tests: every operation then goes through Python, so it is slow)."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

from pipeline.training.memory.estimate import GIB, MemoryEstimate


def reset_peak() -> bool:
    """Start counting the peak now, so the reported peak is the training's and not the setup's. On CPU
    this resets the kernel's high-water mark of the process (VmHWM); False where the kernel refuses."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status() -> str:
    try:
        return Path("/proc/self/status").read_text()
    except OSError:
        return ""


def peak_used(since_reset: bool) -> tuple[int, str]:
    """The peak in bytes and what it counts: the CUDA allocator's peak of tensor memory, or on CPU the
    process's peak resident memory (which also counts Python, the libraries and the data)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    found = re.search(r"VmHWM:\s+(\d+) kB", _proc_status())
    if found:
        return int(found.group(1)) * 1024, "peak RSS" if since_reset else "peak RSS, setup included"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS, setup included"


class PeakTensorMemory:
    """Counts the bytes of live tensor storage under a TorchDispatchMode, so the measure is what
    torch.cuda.max_memory_allocated counts, on any device (a CPU has no allocator statistics).
    For calibration and tests: every operation goes through Python, so it is slow.

        with PeakTensorMemory(*model.parameters()) as tracked:
            ...
        tracked.peak  # bytes
    """

    def __init__(self, *existing: Any) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    tracker.track(tensor)
                return out

        self.live: dict[int, tuple[int, Any]] = {}
        self.now = self.peak = 0
        self.mode = Mode()
        for tensor in existing:
            self.track(tensor)

    def track(self, tensor: Any) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = (storage.nbytes(), weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key)
        self.now -= size

    def __enter__(self) -> PeakTensorMemory:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def memory_metrics(estimate: MemoryEstimate, since_reset: bool) -> dict:
    """The training's peak beside its estimate (on CUDA the same measure: tensor memory; on a CPU the
    peak is the whole process's resident memory, libraries and data included)."""
    peak, kind = peak_used(since_reset)
    return {"peak_memory_gib": peak / GIB, "peak_memory_kind": kind, "memory_estimate_gib": estimate.total / GIB}
