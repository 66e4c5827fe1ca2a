"""Training speed as it is reported: FLOPs per token, the device's peak FLOP/s, and a meter that
turns the Trainer's logging points into a steady figure (after warm-up and compilation, without
evaluations, checkpoint saves and an epoch's short last step) beside the whole-run one.

Times are read at the Trainer's logging steps only: there it has already copied the loss to the
host, so the device has finished the work, and no extra synchronisation is added per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.device import autocast_dtype

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    from pipeline.training.model import Model
    from pipeline.training.plan import Plan

# Dense (not sparse) bf16/fp16 tensor-core peaks with fp32 accumulation, FLOP/s, from the vendors' data sheets,
# keyed by the tokens of the name torch and nvidia-smi give the device: the entry with the most tokens that
# are all in the name wins ("NVIDIA H100 NVL" is the NVL part, not the SXM one; "NVIDIA L40" is not an L4). The
# SXM H100 names itself "NVIDIA H100 80GB HBM3". The T4 has no bf16: its figure is fp16's. No V100 or older:
# the CUDA 13 wheels the image installs need compute capability 7.5. Any other device, and fp32 anywhere,
# is measured (measured_matmul_flops) and named as estimated.
GPU_PEAK_16BIT = {("H100",): 989e12, ("H100", "PCIE"): 756e12, ("H100", "NVL"): 835e12, ("H200",): 989e12,
                  ("H200", "NVL"): 835e12, ("A100",): 312e12, ("L40S",): 362e12, ("L40",): 181e12, ("L4",): 121e12,
                  ("A10",): 125e12, ("A10G",): 125e12, ("RTX", "4090"): 165e12, ("RTX", "3090"): 71e12,
                  ("T4",): 65e12}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int, *, trained: int | None = None,
                    backward_params: int | None = None, backward_layers: int | None = None) -> float:
    """Training FLOPs per token that the run really does (PaLM appendix B's counting): the forward, 2 per
    weight; the input gradient, 2 per weight the backward runs through (`backward_params`: it stops at the
    lowest block with a trained weight); the weight gradient, 2 per trained weight; and attention's
    products, which have no weights: 4·d·T per layer forward, twice that in the `backward_layers`. With
    every weight trained this is nanoGPT's 6N + 12·L·d·T (N without position embeddings). Recomputation
    under gradient checkpointing is not counted (MFU, not hardware FLOPs utilisation)."""
    trained = n_params if trained is None else trained
    backward_params = n_params if backward_params is None else backward_params
    backward_layers = n_layer if backward_layers is None else backward_layers
    attention = 4 * n_embd * block_size
    return 2 * n_params + 2 * backward_params + 2 * trained + attention * (n_layer + 2 * backward_layers)


def model_flops_per_token(model: Model, vocab: int, block_size: int) -> float:
    """flops_per_token of a model as it will train (frozen parts, LoRA adapters). Weights that are only looked
    up, never multiplied, are left out: the position embeddings, and a classifier's token embeddings (a
    language model's are its output layer too). Padding rows of the vocabulary are not counted."""
    from pipeline.training.model import count_parameters, position_embeddings, transformer_layers, without_adapters

    base, blocks = without_adapters(model), transformer_layers(model)
    looked_up = [(p.numel(), p.requires_grad) for m in position_embeddings(model) for p in m.parameters()]
    if base.get_output_embeddings() is None:
        looked_up.append((vocab * base.config.hidden_size, model.get_input_embeddings().weight.requires_grad))
    total, trainable = count_parameters(model, vocab)
    weights = total - sum(n for n, _ in looked_up)
    trained = trainable - sum(n for n, trains in looked_up if trains)
    # the backward reaches down to the lowest trained weight: the embeddings' (below every block), else the
    # lowest block that trains; the frozen blocks under it get no input gradient
    embeddings_train = model.get_input_embeddings().weight.requires_grad or any(trains for _, trains in looked_up)
    lowest = 0 if embeddings_train else next(
        (i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), len(blocks))
    below = sum(p.numel() for b in blocks[:lowest] for p in b.parameters())
    return flops_per_token(weights, len(blocks), base.config.hidden_size, block_size, trained=trained,
                           backward_params=weights - below, backward_layers=len(blocks) - lowest)


def matmul_size(device: str) -> int:
    """The square matmul that measures a device's peak: 8192 on a GPU, large enough to keep it busy (a
    small one measures the launch as much as the product); 2048 on a CPU, where a larger one only takes
    longer."""
    return 8192 if device == "cuda" else 2048


def measured_matmul_flops(dtype_name: str, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in this precision on this device: the achievable peak. On CUDA the warm-up
    has finished before the clock starts, and the clock stops when the queued products have."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = matmul_size(dev)
    synchronize = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = autocast_dtype(dtype_name) or torch.float32
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    a @ b  # warm up: kernel selection, the allocator
    synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def data_sheet_peak(name: str) -> float | None:
    """The 16-bit peak of the GPU `name` from GPU_PEAK_16BIT, matched by tokens; None if it is not there."""
    tokens = set(name.upper().replace("-", " ").split())
    known = [key for key in GPU_PEAK_16BIT if tokens >= set(key)]
    return GPU_PEAK_16BIT[max(known, key=len)] if known else None


def peak_flops(precision: str) -> tuple[float, str]:
    """One device's peak for `precision` and where the figure comes from: a data sheet, or "estimated" by
    a measured matmul (a CPU, fp32, a GPU the table does not know)."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    listed = data_sheet_peak(name) if name != "CPU" and precision in ("bf16", "fp16") else None
    if listed:
        return listed, f"{name}: data sheet, dense {precision}"
    size = matmul_size("cuda" if name != "CPU" else "cpu")
    return measured_matmul_flops(precision), f"{name}: estimated, a measured {size}x{size} {precision} matmul"


def warmup_steps(planned_steps: int) -> int:
    """Steps left out of the steady figure: the first tenth of the run, at least 1 (the first step
    compiles and sets up the optimizer states) and at most 10."""
    return max(1, min(10, planned_steps // 10))


@dataclass
class Interval:
    first_step: int   # the step logged before it
    last_step: int
    seconds: float    # wall time, evaluations taken out
    counted: bool     # no checkpoint was written in it, and it holds no short step


@dataclass
class ThroughputMeter:
    """Per-interval and summary throughput from the times of consecutive training-loss logs. Tokens/s are
    the run's, over all its devices; MFU is per device: those tokens' FLOPs over `devices` peaks."""

    tokens_per_step: int  # the global step's: every process's batch
    flops_per_token: float
    peak_flops: float     # one device's
    warmup: int = 1
    peak_source: str = "given"  # where peak_flops comes from: a data sheet, or a measured matmul (estimated)
    devices: int = 1      # the processes of the run, a device each
    short_every: int = 0  # every epoch's last step is short (a smaller last batch) every this many steps; 0: none
    intervals: list[Interval] = field(default_factory=list)
    start_step: int = 0  # the step training (re)started from
    _last: tuple[int, float] | None = None
    _paused: float = 0.0
    _counted: bool = True

    def begin(self, step: int, now: float) -> None:
        """Training starts (or resumes) at `step`: the warm-up counts from here."""
        self.start_step = step
        self._open(step, now)

    def _open(self, step: int, now: float) -> None:
        self._last, self._paused, self._counted = (step, now), 0.0, True

    def exclude(self, seconds: float) -> None:
        """An evaluation (or sampling) of `seconds` ran in the open interval: not training time. (Both
        are timed between two points where the device has finished its work, so the time is exact.)"""
        self._paused += seconds

    def saved(self) -> None:
        """A checkpoint was written in the open interval. Its time is not known exactly (the save waits
        for the device first), so the interval is left out of the steady figure."""
        self._counted = False

    def log(self, step: int, now: float) -> dict[str, float]:
        """Close the interval at a training-loss log; its tokens/s and MFU (empty if no step ran)."""
        if self._last is None or step <= self._last[0]:
            self._open(step, now)
            return {}
        first, counted = self._last[0], self._counted and not self._short(self._last[0], step)
        interval = Interval(first, step, now - self._last[1] - self._paused, counted)
        self.intervals.append(interval)
        self._open(step, now)
        rate = (interval.last_step - interval.first_step) * self.tokens_per_step / interval.seconds
        return {"perf/tokens_per_second": rate, "perf/mfu": self.mfu(rate)}

    def _short(self, first: int, last: int) -> bool:
        """Whether steps first+1..last hold an epoch's short last step: fewer tokens than tokens_per_step,
        and under torch.compile a new shape, compiled in that step."""
        return bool(self.short_every) and last // self.short_every > first // self.short_every

    def mfu(self, tokens_per_second: float) -> float:
        """Model FLOPs utilisation per device of the run's `tokens_per_second`."""
        return tokens_per_second * self.flops_per_token / (self.devices * self.peak_flops)

    def steady(self) -> dict[str, float | int | None]:
        """Tokens/s and MFU over the intervals after warm-up without a checkpoint save or a short step
        (evaluations taken out); None when the run had none."""
        kept = [i for i in self.intervals if i.counted and i.first_step >= self.start_step + self.warmup]
        steps, seconds = sum(i.last_step - i.first_step for i in kept), sum(i.seconds for i in kept)
        rate = steps * self.tokens_per_step / seconds if seconds > 0 else None
        return {"steady_tokens_per_second": rate, "steady_mfu": self.mfu(rate) if rate else None,
                "steady_steps": steps, "warmup_steps": self.warmup}


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


def run_meter(model: Model, vocab: int, plan: Plan) -> ThroughputMeter:
    """The meter of this run's throughput: the FLOPs per token this model really does as it trains (frozen
    parts and LoRA included), one device's peak, and the run's devices (MFU is per device)."""
    peak, source = peak_flops(plan.precision)
    flops = model_flops_per_token(model, vocab, plan.block_size)
    return ThroughputMeter(plan.tokens_per_step, flops, peak, warmup=warmup_steps(plan.steps), peak_source=source,
                           devices=plan.world_size, short_every=plan.short_every)
