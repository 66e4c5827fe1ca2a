"""What a training run will do, decided before the Trainer exists: its steps and batch, precision,
whether it is compiled, its attention implementation, and the memory it will need (checked against the
device before anything is moved onto it)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

from pipeline.common import PipelineError
from pipeline.config import TrainConfig
from pipeline.memory import MemoryEstimate, RunShape, estimate_memory, model_shape, preflight
from pipeline.model import auto_attention, check_attention, fastest_attention, use_compile

log = logging.getLogger("pipeline.train")


@dataclass(frozen=True)
class Plan:
    """What the run will do, decided before the Trainer exists."""

    precision: str
    device: str
    world_size: int
    block_size: int
    steps: int              # optimizer steps planned
    effective_batch: int    # blocks per optimizer step, all devices
    compile: bool

    @property
    def tokens_per_step(self) -> int:
        return self.effective_batch * self.block_size


def plan(t: TrainConfig, precision: str, train_blocks: int, block_size: int) -> Plan:
    """Steps as the Trainer counts them (optimizer steps per epoch rounded up, times epochs), and the
    compile decision, which depends on the tokens the run will train on."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(train_blocks / (t.per_device_train_batch_size * world))
    per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if effective > train_blocks:
        raise PipelineError(f"params: the effective batch, train.per_device_train_batch_size x "
                            f"gradient_accumulation_steps x {world} device(s) = {effective} blocks, exceeds the "
                            f"{train_blocks} training blocks; lower them, or add data")
    if t.warmup_steps > steps:
        raise PipelineError(f"params: train.warmup_steps ({t.warmup_steps}) exceeds the {steps} steps planned; "
                            "lower it")
    compiled, why = use_compile(t.torch_compile, device, steps * effective * block_size)
    log.info("torch.compile: %s (%s)", "on" if compiled else "off", why)
    return Plan(precision, device, world, block_size, steps, effective, compiled)


def run_shape(t: TrainConfig, run: Plan, attention: str, model: Any) -> RunShape:
    dropout = t.dropout if t.dropout is not None else max(
        (m.p for m in model.modules() if type(m).__name__ == "Dropout"), default=0.0)
    return RunShape(run.device, run.precision, t.per_device_train_batch_size, t.per_device_eval_batch_size,
                    run.block_size, t.gradient_accumulation_steps, attention, dropout, run.compile,
                    t.gradient_checkpointing, t.optimizer)


def choose_attention(model: Any, t: TrainConfig, run: Plan, blocks: Any, resumed: str | None) -> dict:
    """Set the attention implementation. A resumed run keeps the one it started with (the same numerics)."""
    check_attention(t.attn_implementation, run.precision)
    auto = not resumed and t.attn_implementation == "auto"
    chosen = auto_attention_here(model, t, run, blocks) if auto else {"attention": resumed or t.attn_implementation}
    model.set_attn_implementation(chosen["attention"])
    timings = chosen.get("attention_timings_ms")
    log.info("attention: %s%s", chosen["attention"], f" (timed forward+backward on one block: "
             f"{', '.join(f'{k} {v:.0f} ms' for k, v in timings.items())})" if timings else "")
    return chosen


def auto_attention_here(model: Any, t: TrainConfig, run: Plan, blocks: Any) -> dict:
    """`auto`: nothing is run on CUDA (pipeline.model.auto_attention); on a CPU sdpa and eager are timed
    on one block, unless the estimate says eager on one block needs more memory than the training."""
    named = auto_attention(run.device, run.precision)
    if named:
        return {"attention": named}
    shape, training = model_shape(model), run_shape(t, run, "sdpa", model)
    probe = replace(training, batch=1, eval_batch=1, accumulation=1, attention="eager")
    if estimate_memory(shape, probe).training > estimate_memory(shape, training).training:
        log.info("attention auto: not timed, eager attention on one block would need more memory than the training")
        return {"attention": "sdpa"}
    from transformers import default_data_collator

    one = {k: v.to(run.device) for k, v in default_data_collator([blocks[0]]).items()}
    best, timings = agree_across_ranks(fastest_attention(model, one, run.precision))
    return {"attention": best, "attention_timings_ms": {k: round(v * 1000, 1) for k, v in timings.items()}}


def agree_across_ranks(value: Any) -> Any:
    """Rank 0's value on every rank (measured choices must not differ between DDP processes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_memory(model: Any, t: TrainConfig, run: Plan, attention: str) -> MemoryEstimate:
    """The estimate of the training's peak; with memory_preflight, a stop (with the batch that fits)
    when it exceeds the free memory."""
    shape, shape_of_run = model_shape(model), run_shape(t, run, attention, model)
    if t.memory_preflight:
        return preflight(shape, shape_of_run, t.lora.enabled)
    return estimate_memory(shape, shape_of_run)
