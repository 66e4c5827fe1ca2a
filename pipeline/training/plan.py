"""What a training run will do, decided before the model is loaded: its steps and effective batch,
precision, sharding and torch.compile (make_plan), and whether DDP must look for unused parameters. The
attention implementation is decided on the loaded model (pipeline.training.attention), the memory it
will need against the device (pipeline.training.memory.estimate)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.config import TrainConfig
from pipeline.core.device import resolve_precision
from pipeline.core.errors import PipelineError

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


def make_plan(t: TrainConfig, train_blocks: int, block_size: int) -> Plan:
    """Precision, and steps as the Trainer counts them (optimizer steps per epoch rounded up, times
    epochs), and the compile decision, which depends on the tokens the run will train on."""
    import torch

    precision = resolve_precision(t.precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(train_blocks / (t.per_device_train_batch_size * world))
    per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
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
