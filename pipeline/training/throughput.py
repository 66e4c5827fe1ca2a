"""Training speed as it is reported: FLOPs per token, the device's peak FLOP/s, and a meter that
turns the Trainer's logging points into a steady figure (after warm-up and compilation, without
evaluations and checkpoint saves) beside the whole-run one.

Times are read at the Trainer's logging steps only: there it has already copied the loss to the
host, so the device has finished the work, and no extra synchronisation is added per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.device import autocast_dtype

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets; fp32 falls back to a measurement.
GPU_PEAK_16BIT = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12, "H100 PCIe": 756e12,
                  "H100": 756e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "A10": 125e12, "L4": 121e12,
                  "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate (PaLM appendix B): 6N for the weights' forward and
    backward (N without position embeddings), 12·L·d·T for attention."""
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def measured_matmul_flops(dtype_name: str, size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in this precision on this device: the achievable peak."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = autocast_dtype(dtype_name) or torch.float32
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def peak_flops(precision: str) -> tuple[float, str]:
    """The device's peak for `precision` and where the figure comes from."""
    import torch

    if torch.cuda.is_available() and precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_16BIT.items():
            if key in name:
                return flops, f"{name} data sheet"
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return measured_matmul_flops(precision), f"{device_name}, measured 2048x2048 {precision} matmul"


def warmup_steps(planned_steps: int) -> int:
    """Steps left out of the steady figure: the first tenth of the run, at least 1 (the first step
    compiles and sets up the optimizer states) and at most 10."""
    return max(1, min(10, planned_steps // 10))


@dataclass
class Interval:
    first_step: int   # the step logged before it
    last_step: int
    seconds: float    # wall time, evaluations taken out
    pure: bool        # no checkpoint was written in it


@dataclass
class ThroughputMeter:
    """Per-interval and summary throughput from the times of consecutive training-loss logs."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    warmup: int = 1
    peak_source: str = "given"  # where peak_flops comes from: a data sheet, or a measured matmul
    intervals: list[Interval] = field(default_factory=list)
    origin: int = 0  # the step training (re)started from
    _last: tuple[int, float] | None = None
    _paused: float = 0.0
    _pure: bool = True

    def begin(self, step: int, now: float) -> None:
        """Training starts (or resumes) at `step`: the warm-up counts from here."""
        self.origin = step
        self._open(step, now)

    def _open(self, step: int, now: float) -> None:
        self._last, self._paused, self._pure = (step, now), 0.0, True

    def exclude(self, seconds: float) -> None:
        """An evaluation (or sampling) of `seconds` ran in the open interval: not training time. (Both
        are timed between two points where the device has finished its work, so the time is exact.)"""
        self._paused += seconds

    def saved(self) -> None:
        """A checkpoint was written in the open interval. Its time is not known exactly (the save waits
        for the device first), so the interval is left out of the steady figure."""
        self._pure = False

    def log(self, step: int, now: float) -> dict[str, float]:
        """Close the interval at a training-loss log; its tokens/s and MFU (empty if no step ran)."""
        if self._last is None or step <= self._last[0]:
            self._open(step, now)
            return {}
        interval = Interval(self._last[0], step, now - self._last[1] - self._paused, self._pure)
        self.intervals.append(interval)
        self._open(step, now)
        rate = (interval.last_step - interval.first_step) * self.tokens_per_step / interval.seconds
        return {"perf/tokens_per_second": rate, "perf/mfu": rate * self.flops_per_token / self.peak_flops}

    def steady(self) -> dict[str, float | int | None]:
        """Tokens/s and MFU over the intervals after warm-up without a checkpoint save (evaluations taken
        out); None when the run had none."""
        kept = [i for i in self.intervals if i.pure and i.first_step >= self.origin + self.warmup]
        steps, seconds = sum(i.last_step - i.first_step for i in kept), sum(i.seconds for i in kept)
        rate = steps * self.tokens_per_step / seconds if seconds > 0 else None
        return {"steady_tokens_per_second": rate, "steady_mfu": rate * self.flops_per_token / self.peak_flops
                if rate else None, "steady_steps": steps, "warmup_steps": self.warmup}


def meter_callback(meter: ThroughputMeter) -> TrainerCallback:
    """A TrainerCallback that feeds `meter` and adds each interval's perf/tokens_per_second and perf/mfu
    to the training log (callbacks after it, such as dvclive's, see them)."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
            meter.begin(state.global_step, time.perf_counter())

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs if logs is not None else {}
            if "eval_runtime" in logs:
                meter.exclude(logs["eval_runtime"])
            if "loss" in logs:
                logs.update(meter.log(state.global_step, time.perf_counter()))

        def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
            meter.saved()

    return Meter()
