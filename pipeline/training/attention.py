"""The attention implementation a run trains with (train.attn_implementation): as asked, or for `auto`
by rule on CUDA and timed on one block on a CPU; a resumed run keeps the one it started with."""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pipeline.core.config import TrainConfig
from pipeline.core.device import autocast_dtype
from pipeline.core.errors import PipelineError
from pipeline.training.memory.estimate import estimate_memory, model_shape, run_shape
from pipeline.training.plan import Plan

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attention:
    """The attention implementation, with the timings behind it where `auto` measured (CPU)."""

    implementation: str
    timings_ms: dict[str, float] | None = None

    def metrics(self) -> dict:
        timings = {"attention_timings_ms": self.timings_ms} if self.timings_ms else {}
        return {"attention": self.implementation, **timings}


def choose_attention(model: PreTrainedModel, t: TrainConfig, plan: Plan, blocks: Dataset,
                     resumed: str | None) -> Attention:
    """Set the attention implementation. A resumed run keeps the one it started with (the same numerics)."""
    check_attention(t.attn_implementation, plan.precision)
    if resumed or t.attn_implementation != "auto":
        chosen = Attention(resumed or t.attn_implementation)
    else:
        chosen = auto_attention(model, t, plan, blocks)
    model.set_attn_implementation(chosen.implementation)
    timings = chosen.timings_ms
    log.info("attention: %s%s", chosen.implementation, f" (timed forward+backward on one block: "
             f"{', '.join(f'{k} {v:.0f} ms' for k, v in timings.items())})" if timings else "")
    return chosen


def flash_attention_installed() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def check_attention(requested: str, precision: str) -> None:
    if requested == "flash_attention_2" and not flash_attention_installed():
        raise PipelineError("train.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
                            "(pip install flash-attn); use sdpa or auto")
    if requested == "flash_attention_2" and precision == "fp32":
        raise PipelineError("train.attn_implementation=flash_attention_2 runs in bf16 or fp16 only; set "
                            "train.precision: bf16 (or auto), or use sdpa")


def auto_attention(model: PreTrainedModel, t: TrainConfig, plan: Plan, blocks: Dataset) -> Attention:
    """`auto`: by rule on CUDA (attention_by_rule); on a CPU sdpa and eager are timed on one block,
    unless the estimate says eager on one block needs more memory than the training."""
    named = attention_by_rule(plan.device, plan.precision)
    if named:
        return Attention(named)
    shape, training = model_shape(model), run_shape(t, plan, "sdpa", model)
    probe = replace(training, batch=1, eval_batch=1, accumulation=1, attention="eager")
    if estimate_memory(shape, probe).training > estimate_memory(shape, training).training:
        log.info("attention auto: not timed, eager attention on one block would need more memory than the training")
        return Attention("sdpa")
    from transformers import default_data_collator

    one = {k: v.to(plan.device) for k, v in default_data_collator([blocks[0]]).items()}
    best, timings = agree_across_ranks(fastest_attention(model, one, plan.precision))
    return Attention(best, {k: round(v * 1000, 1) for k, v in timings.items()})


def attention_by_rule(device: str, precision: str) -> str | None:
    """The choice `auto` makes without measuring, or None where it measures. On CUDA nothing is run:
    flash_attention_2 where installed (16-bit), else sdpa (PyTorch's flash and memory-efficient kernels).
    Timing eager attention there would run the B x heads x T^2 score matrices at the training batch,
    which can need more memory than the training itself (docs/speed.md). On a CPU, eager and sdpa are
    close and either can win, so it measures, at one block."""
    if device == "cuda":
        return "flash_attention_2" if flash_attention_installed() and precision != "fp32" else "sdpa"
    return None


def fastest_attention(model: PreTrainedModel, batch: dict, precision: str, trials: int = 2
                      ) -> tuple[str, dict[str, float]]:
    """Time a forward+backward of `batch` under sdpa and eager and return the fastest with the timings.
    Gradients, RNG state and train/eval mode are left as they were. One untimed warm-up each, then
    `trials` rounds that take them in turn, keeping each one's fastest time: on a shared machine a
    burst of load then slows one round, not one contender. Training mode, as the steps will run:
    dropout is part of the cost (with dropout sdpa on a CPU leaves its fused kernel)."""
    import torch

    autocast = autocast_dtype(precision)
    device_type = next(model.parameters()).device.type
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()

    def seconds(name: str) -> float:
        model.set_attn_implementation(name)
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = ["sdpa", "eager"]
    for name in names:
        seconds(name)  # warm-up: kernels, allocator
    timings = {name: math.inf for name in names}
    for _ in range(trials):
        for name in names:
            timings[name] = min(timings[name], seconds(name))
    model.train(was_training)
    torch.set_rng_state(rng)
    fastest = min(timings, key=timings.get)
    # keep sdpa (PyTorch's default) unless eager is clearly faster, so close timings do not flip the
    # choice, and with it the last bits of the results, from run to run
    return (fastest if timings[fastest] < 0.9 * timings["sdpa"] else "sdpa"), timings


def agree_across_ranks(value: Any) -> Any:
    """Rank 0's value on every rank (measured choices must not differ between DDP processes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    objects = [value]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]
