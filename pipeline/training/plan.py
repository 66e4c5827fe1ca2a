"""What a training run will do, each decision in one place, made before the Trainer exists: its steps and
effective batch, precision and torch.compile (make_plan, before the model is loaded), the attention
implementation (choose_attention: measured on the model where that is cheap) and the memory it will
need, checked against the device before anything is moved onto it (estimated_memory)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pipeline.core.config import TrainConfig
from pipeline.core.device import autocast_dtype, resolve_precision
from pipeline.core.errors import PipelineError
from pipeline.training.memory import MemoryEstimate, RunShape, estimate_memory, model_shape, preflight

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The run's schedule, precision and compile decision."""

    precision: str
    device: str
    world_size: int
    block_size: int
    steps: int              # optimizer steps planned
    effective_batch: int    # blocks per optimizer step, all devices
    compile: bool
    sharding: str = "none"  # none (DDP), zero2, zero3 (DeepSpeed ZeRO across the world_size processes)
    short_every: int = 0    # every epoch's last step has fewer blocks, every this many steps (0: none)

    @property
    def tokens_per_step(self) -> int:
        return self.effective_batch * self.block_size


@dataclass(frozen=True)
class Attention:
    """The attention implementation, with the timings behind it where `auto` measured (CPU)."""

    implementation: str
    timings_ms: dict[str, float] | None = None

    def metrics(self) -> dict:
        timings = {"attention_timings_ms": self.timings_ms} if self.timings_ms else {}
        return {"attention": self.implementation, **timings}


def make_plan(t: TrainConfig, train_blocks: int, block_size: int) -> Plan:
    """Precision, and steps as the Trainer counts them (optimizer steps per epoch rounded up, times
    epochs), and the compile decision, which depends on the tokens the run will train on."""
    import torch

    precision = resolve_precision(t.precision)
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
    check_sharding(t.sharding, world)
    compiled, why = use_compile(t.torch_compile, device, steps * effective * block_size)
    if compiled and t.sharding != "none":  # only `auto` gets here: an explicit true is refused with sharding
        compiled, why = False, f"auto: off with train.sharding: {t.sharding} (the DeepSpeed engine runs it eagerly)"
    log.info("torch.compile: %s (%s)", "on" if compiled else "off", why)
    short = short_epoch_end(train_blocks, t.per_device_train_batch_size, world, t.gradient_accumulation_steps)
    return Plan(precision, device, world, block_size, steps, effective, compiled, t.sharding,
                per_epoch if short else 0)


def short_epoch_end(blocks: int, batch: int, world: int, accumulation: int) -> bool:
    """Whether an epoch's last optimizer step has fewer blocks than the others: its last batch is smaller
    (one process; several top it up with repeated blocks, accelerate's even_batches) or its accumulation
    has fewer batches left. Such a step trains fewer tokens, and under torch.compile its new shape compiles
    a graph of its own (automatic dynamic shapes are off), so the throughput meter leaves it out."""
    batches = math.ceil(blocks / (batch * world))
    return (world == 1 and blocks % batch != 0) or batches % accumulation != 0


def check_sharding(sharding: str, world: int) -> None:
    """Sharding needs processes to shard over, and DeepSpeed installed."""
    if sharding == "none":
        return
    if world < 2:
        raise PipelineError(f"train.sharding: {sharding} splits the training state across processes, and this run "
                            "has 1; start it on several GPUs (NPROC_PER_NODE=N, make docker-train GPUS=N, or "
                            "NNODES) or set train.sharding: none")
    if importlib.util.find_spec("deepspeed") is None:
        raise PipelineError(f"train.sharding: {sharding} runs on DeepSpeed, which is not installed; pip install "
                            "deepspeed (requirements.lock pins it), or set train.sharding: none")


# --- DDP --------------------------------------------------------------------------------------------

def find_unused_parameters(model: PreTrainedModel, plan: Plan, blocks: Dataset | list[dict]) -> bool:
    """DDP's find_unused_parameters: whether the model has trainable parameters its loss does not use. With
    it DDP walks the autograd graph after every forward (the Trainer's default, for any model without
    gradient checkpointing); without it a parameter that gets no gradient stops the run at the next step.
    Only a DDP run of several processes asks."""
    if plan.world_size == 1 or plan.sharding != "none":
        return False
    unused = unused_parameters(model, blocks[0])
    if unused:
        log.info("DDP looks for unused parameters after every forward: %d trainable ones take no part in the loss "
                 "(%s)", len(unused), ", ".join(unused[:3]))
    return bool(unused)


def unused_parameters(model: PreTrainedModel, block: dict) -> list[str]:
    """The trainable parameters the loss of a few tokens of `block` does not reach: one forward on the
    model where it is (the CPU, before the Trainer moves it), its graph walked without a backward, the RNG
    state put back (dropout draws from it)."""
    import torch
    from transformers import default_data_collator

    batch = {k: v[:, :8] if v.dim() > 1 else v for k, v in default_data_collator([block]).items()}
    with torch.random.fork_rng(devices=[]):
        nodes = [model(**batch).loss.grad_fn]
    seen, reached = set(), set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf, a parameter
            reached.add(id(node.variable))
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


# --- torch.compile ---------------------------------------------------------------------------------

# torch.compile costs a fixed time up front and then saves a part of every step: the figures behind this
# threshold are in docs/speed.md ("What a training step is made of").
COMPILE_MIN_TOKENS = 5_000_000


def use_compile(requested: bool | str, device: str, planned_tokens: int) -> tuple[bool, str]:
    """Whether to torch.compile, and why. `auto`: on CUDA, for runs of at least COMPILE_MIN_TOKENS
    tokens; never on a CPU, where it does not pay (docs/speed.md)."""
    if requested != "auto":
        return bool(requested), "train.torch_compile"
    if device != "cuda":
        return False, "auto: off on CPU"
    if planned_tokens < COMPILE_MIN_TOKENS:
        return False, f"auto: {planned_tokens / 1e6:.1f}M tokens planned, it pays from {COMPILE_MIN_TOKENS / 1e6:.0f}M"
    return True, f"auto: CUDA, {planned_tokens / 1e6:.1f}M tokens planned"


# --- attention -------------------------------------------------------------------------------------

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


# --- memory ----------------------------------------------------------------------------------------

def estimated_memory(model: PreTrainedModel, t: TrainConfig, plan: Plan, attention: str) -> MemoryEstimate:
    """The estimate of the training's peak; with memory_preflight checked against the free memory first
    (a stop, with the batch that fits, when it would not)."""
    shape, run = model_shape(model), run_shape(t, plan, attention, model)
    return preflight(shape, run, t.lora.enabled) if t.memory_preflight else estimate_memory(shape, run)


def run_shape(t: TrainConfig, plan: Plan, attention: str, model: PreTrainedModel) -> RunShape:
    dropout = t.dropout if t.dropout is not None else max(
        (m.p for m in model.modules() if type(m).__name__ == "Dropout"), default=0.0)
    return RunShape(plan.device, plan.precision, t.per_device_train_batch_size, t.per_device_eval_batch_size,
                    plan.block_size, t.gradient_accumulation_steps, attention, dropout, plan.compile,
                    t.gradient_checkpointing, t.optimizer, plan.sharding, plan.world_size)
