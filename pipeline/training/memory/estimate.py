"""Training memory: a calibrated estimate of the peak, and the preflight that stops a run that would not
fit with the batch size that does (the peak actually reached: pipeline.training.peak).

A training step is at its peak at the end of the forward pass, when the loss's gradient is formed
while every activation saved for the backward is still held. The estimate adds what is alive then:

    weights            4 bytes per parameter (fp32 master weights)
    optimizer states   8 per trainable parameter (AdamW's two moments)
    gradients          4 per trainable parameter, only when they are held: across accumulation, or in DDP's
                       all-reduce buckets, which live for the whole run (the gradients are views of them)
    16-bit copies      2 per parameter: autocast casts each weight once and keeps the copy for the backward
    activations        n_layer x tokens x hidden x `layer` bytes, plus n_layer x batch x heads x T^2 x
                       `scores` where attention materialises its score matrix (eager; sdpa on a CPU with
                       dropout, which falls back to the math kernel)
    logits             tokens x vocabulary x `logits` bytes (logits, their fp32 copy, the loss's gradient)

and takes the larger of that, the optimizer step (weights, gradients and states) and an evaluation
batch. The per-unit byte counts are measured per device kind, not taken from theory (Korthikanti et al.'s
count is lower: Hugging Face's GPT-2 keeps more eagerly, and autocast keeps some of it in fp32); docs/speed.md
("Memory") gives them with where and when they were measured. On a GPU, `python bench/bench.py
--only memory` prints the estimate beside the measured peak of the train stage for GPT-2 shapes up to
gpt2-xl; on a CPU, tests/training/test_memory.py holds it to the tensor memory of real steps.

The estimate is tensor memory, what torch.cuda.max_memory_allocated counts. The preflight holds it to the
free memory with two allowances for what that leaves out (estimate_limit): the caching allocator's gap
(it reserves memory in blocks beyond what it hands out, and the free memory is what is left to reserve)
and NCCL's buffers, which it allocates outside PyTorch's allocator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from pipeline.training.plan import Plan

log = logging.getLogger(__name__)
GIB = 1024**3


@dataclass(frozen=True)
class Calibration:
    """Bytes per unit of a training step, measured on one kind of device."""

    layer: float        # per layer x token x hidden unit, saved for the backward
    scores: float       # per attention score element, where the score matrix is materialised
    logits: float       # per logit in training: the logits, their fp32 copy, the gradients
    eval_logits: float  # per logit in an evaluation forward (no gradients)
    lora: float         # per element of an adapted module's input (LoRA keeps a dropped-out copy)
    checkpoint: float   # per layer x token x hidden unit with gradient checkpointing (each block's input)
    source: str


# What each coefficient was fitted to, on which machine and when, and how far the estimate is from what was
# measured: docs/speed.md ("Memory"); `source` names the kind of measurement.
_CPU_SOURCE = "pipeline.training.memory.peak.PeakTensorMemory of real steps on a CPU"
_H100_SOURCE = "torch.cuda.max_memory_allocated of the train stage on an H100"
CALIBRATION: dict[tuple[str, str, bool], Calibration] = {
    # (device type, "16-bit" or "fp32", torch.compile)
    ("cuda", "16-bit", False): Calibration(86.2, 7.0, 12.25, 10.3, 2.0, 4.1, _H100_SOURCE),
    ("cuda", "16-bit", True): Calibration(44.8, 7.0, 9.0, 10.3, 2.0, 4.1, _H100_SOURCE),
    # fp32 keeps the same tensors on every device (no autocast), so the CPU's figures stand for CUDA too
    ("cuda", "fp32", False): Calibration(120.2, 12.0, 12.1, 8.1, 4.5, 4.1, _CPU_SOURCE),
    ("cpu", "16-bit", False): Calibration(64.1, 14.0, 12.0, 10.3, 4.5, 4.1, _CPU_SOURCE),
    ("cpu", "fp32", False): Calibration(120.2, 12.0, 12.1, 8.1, 4.5, 4.1, _CPU_SOURCE),
}
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adafactor": 0, "sgd": 0}

# Allowances, not measurements (docs/speed.md, "Memory"), for what the estimate leaves out:
# the caching allocator reserves beyond what it hands out (blocks split and cached; the gap between
# torch.cuda.max_memory_reserved and max_memory_allocated);
ALLOCATOR_GAP = 0.10
# NCCL's channel buffers (NCCL_BUFFSIZE, 4 MiB per protocol, channel and peer: a few hundred MiB on an 8-GPU
# NVLink host) and NVLink SHARP's on NVSwitch hosts, allocated outside PyTorch's allocator, per process;
COLLECTIVE_BUFFERS = GIB
# and the estimate's own error on shapes it was not fitted to (docs/speed.md gives the errors measured): the
# GPU profiles and the tables in docs/speed.md keep this much more, so their batch sizes do not sit inside it.
ESTIMATE_ERROR = 0.10


def calibration(device: str, precision: str, compiled: bool) -> Calibration:
    """The measured coefficients for this device, precision and compile setting. Where compile was not
    measured (CPU, fp32) the eager figures stand in: compiling saves memory, so they over-estimate."""
    kind = "fp32" if precision == "fp32" else "16-bit"
    return CALIBRATION.get((device, kind, compiled)) or CALIBRATION[(device, kind, False)]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model as it will train."""

    parameters: int      # all, vocabulary padding rows included
    trainable: int
    block_parameters: int
    n_layer: int
    hidden: int
    heads: int
    vocab: int           # rows of the output matrix (padded)
    lora_inputs: int = 0  # per block: the input widths of the modules with LoRA adapters, summed


@dataclass(frozen=True)
class RunShape:
    """How it will train."""

    device: str          # "cuda" or "cpu"
    precision: str       # fp32, bf16 or fp16
    batch: int           # per device
    eval_batch: int
    block_size: int
    accumulation: int = 1
    attention: str = "sdpa"
    dropout: float = 0.1
    compiled: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch_fused"
    sharding: str = "none"  # none (DDP: all of it on every process), zero2, zero3
    shards: int = 1         # the processes of the run: sharded states are split across them, DDP's are not


@dataclass(frozen=True)
class MemoryEstimate:
    states: int       # weights, optimizer states, held gradients, 16-bit copies
    activations: int  # saved for the backward, one micro-batch
    logits: int
    step: int         # the optimizer step: weights, gradients and states
    evaluation: int   # an evaluation batch, optimizer states alive

    @property
    def training(self) -> int:
        return self.states + self.activations + self.logits

    @property
    def total(self) -> int:
        return max(self.training, self.step, self.evaluation)


def scores_materialised(run: RunShape) -> bool:
    """Whether attention keeps its B x heads x T x T score matrix for the backward."""
    if run.attention == "eager":
        return True
    # sdpa: CUDA's flash / memory-efficient kernels keep O(T); on a CPU its fused kernel has no dropout,
    # so with dropout it falls back to the math kernel, which keeps the scores as eager does
    return run.attention == "sdpa" and run.device == "cpu" and run.dropout > 0


def estimate_memory(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """Peak bytes of one training step (see the module's docstring)."""
    c = calibration(run.device, run.precision, run.compiled)
    sixteen_bit = run.precision in ("bf16", "fp16")
    state_bytes = OPTIMIZER_STATE_BYTES.get(run.optimizer, 8)
    tokens = run.batch * run.block_size
    per_layer = tokens * model.hidden * c.layer + tokens * model.lora_inputs * c.lora
    if scores_materialised(run):
        per_layer += run.batch * model.heads * run.block_size**2 * c.scores
    if run.gradient_checkpointing:  # each block's input, and one block recomputed at a time
        activations = model.n_layer * tokens * model.hidden * c.checkpoint + per_layer
        copied = model.parameters - (model.n_layer - 1) * model.block_parameters  # blocks re-cast when recomputed
    else:
        activations = model.n_layer * per_layer
        copied = model.parameters
    if run.sharding == "none":
        held = run.accumulation > 1 or run.shards > 1  # accumulated, or in DDP's buckets (run.shards: processes)
        states = (4 * model.parameters + state_bytes * model.trainable
                  + (4 * model.trainable if held else 0) + (2 * copied if sixteen_bit else 0))
        step = 4 * model.parameters + (4 + state_bytes) * model.trainable
        resident = 4 * model.parameters + state_bytes * model.trainable
    else:
        states = step = resident = sharded_states(model, run, sixteen_bit, state_bytes)
    evaluation = resident + run.eval_batch * run.block_size * model.vocab * c.eval_logits
    return MemoryEstimate(int(states), int(activations), int(tokens * model.vocab * c.logits), int(step),
                          int(evaluation))


def sharded_states(model: ModelShape, run: RunShape, sixteen_bit: bool, state_bytes: int) -> float:
    """One process's share of the state under DeepSpeed ZeRO. DeepSpeed casts the model itself to 16 bits
    under bf16/fp16 and keeps the fp32 master weights in the optimizer; zero2 splits those, the AdamW
    states and the fp32 gradients across the processes, zero3 the model's weights too, gathering each
    block's whole while it runs (two blocks with prefetch, and the embedding, which GPT-2 also reads for
    the logits). An estimate from the sizes alone, not fitted to measurements (docs/scaling.md)."""
    width = 2 if sixteen_bit else 4
    split = ((4 if sixteen_bit else 0) + state_bytes + 4) * model.trainable / run.shards
    if run.sharding == "zero2":
        return width * model.parameters + split
    gathered = width * (2 * model.block_parameters + model.vocab * model.hidden)
    return width * model.parameters / run.shards + gathered + split


def model_shape(model: PreTrainedModel | PeftModel) -> ModelShape:
    """The ModelShape of a transformers causal LM or sequence classifier (maybe inside a peft wrapper), as it
    will train. A classifier's logits are one per label, not one per vocabulary entry."""
    from pipeline.training.model import transformer_layers, without_adapters

    base = without_adapters(model)
    config = base.config
    params = list(model.parameters())
    first = transformer_layers(model)[0]
    adapted = [m for m in first.modules() if hasattr(m, "lora_A")]
    output = base.get_output_embeddings()
    return ModelShape(
        parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
        block_parameters=sum(p.numel() for p in first.parameters()), n_layer=config.num_hidden_layers,
        hidden=config.hidden_size, heads=config.num_attention_heads,
        vocab=output.weight.shape[0] if output is not None else config.num_labels,
        lora_inputs=sum(m.in_features for m in adapted))


# --- the preflight ---------------------------------------------------------------------------------

def free_memory() -> tuple[int, str]:
    """Bytes free on the training device, and its name."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, torch.cuda.get_device_name()
    import psutil

    return psutil.virtual_memory().available, "CPU RAM"


def largest_fitting(fits: Callable[[int], bool], most: int) -> int:
    """The largest batch in 1..most for which `fits` holds (0: not even 1); memory grows with the batch."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def collective_buffers(run: RunShape) -> int:
    """NCCL's buffers in each process of a multi-GPU run (an allowance: COLLECTIVE_BUFFERS)."""
    return COLLECTIVE_BUFFERS if run.device == "cuda" and run.shards > 1 else 0


def estimate_limit(free: float, run: RunShape) -> float:
    """The largest estimate that fits `free` bytes: room kept for NCCL's buffers and the allocator's gap."""
    return (free - collective_buffers(run)) / (1 + ALLOCATOR_GAP)


def fits_card(model: ModelShape, run: RunShape, card: float) -> bool:
    """Whether `run` fits a card with `card` bytes free with room for the estimate's own error besides the
    preflight's allowances: what the GPU profiles and docs/speed.md's tables are held to."""
    return estimate_memory(model, run).total * (1 + ESTIMATE_ERROR) <= estimate_limit(card, run)


def preflight(model: ModelShape, run: RunShape, lora: bool) -> MemoryEstimate:
    """Estimate the peak and fail before training, with the batch size that fits, when the estimate and
    the allowances for the allocator and NCCL exceed the free memory. Returns the estimate."""
    estimate = estimate_memory(model, run)
    free, where = free_memory()
    log.info("memory preflight: estimated peak %.1f GiB (states %.1f, activations %.1f, logits %.1f, evaluation "
             "%.1f); %.1f GiB free on %s", estimate.total / GIB, estimate.states / GIB, estimate.activations / GIB,
             estimate.logits / GIB, estimate.evaluation / GIB, free / GIB, where)
    limit = estimate_limit(free, run)
    if estimate.total <= limit:
        return estimate
    nccl = collective_buffers(run)
    needed = estimate.total * (1 + ALLOCATOR_GAP) + nccl
    kept = f"{ALLOCATOR_GAP:.0%} for the allocator" + (f" and {nccl / GIB:.0f} GiB for NCCL" if nccl else "")
    raise PipelineError(f"training needs about {needed / GIB:.1f} GiB (the estimated peak, {estimate.total / GIB:.1f}"
                        f" GiB, and {kept}) but {where} has {free / GIB:.1f} GiB free; "
                        f"{' or '.join(fixes(model, run, lora, free))}")


def fixes(model: ModelShape, run: RunShape, lora: bool, free: float) -> list[str]:
    """What to change to fit `free` bytes, most direct first: the batch sizes that fit (keeping the
    effective batch), then the levers that shrink the rest."""
    def at(**changes: Any) -> MemoryEstimate:
        return estimate_memory(model, replace(run, **changes))

    limit, found = estimate_limit(free, run), []
    if at().evaluation > limit:
        fits = largest_fitting(lambda b: at(eval_batch=b).evaluation <= limit, run.eval_batch)
        if fits:
            found.append(f"set train.per_device_eval_batch_size: {fits}")
    if max(at().training, at().step) > limit:
        fits = largest_fitting(lambda b: max(at(batch=b).training, at().step) <= limit, run.batch)
        effective = run.batch * run.accumulation
        keeps = max((b for b in range(1, fits + 1) if effective % b == 0), default=0)
        if keeps:
            found.append(f"set train.per_device_train_batch_size: {keeps} with gradient_accumulation_steps: "
                         f"{effective // keeps} (the same effective batch of {effective} blocks; about "
                         f"{at(batch=keeps, accumulation=effective // keeps).training / GIB:.1f} GiB)")
        if not run.gradient_checkpointing:
            found.append("train.gradient_checkpointing: true")
        if not lora:
            found.append("train.lora.enabled: true")
        if not lora and run.sharding != "zero3":
            found.append(sharding_fix(model, run, free))
    return [fix for fix in found if fix] or ["a device with more memory"]


def sharding_fix(model: ModelShape, run: RunShape, free: float) -> str:
    """train.sharding: zero3 across this run's processes, or across the fewest of 2, 4 or 8 GPUs that makes
    it fit `free` bytes by the estimate (NCCL's buffers kept), with the per-process figure; '' when not even
    8 would."""
    for shards in [run.shards] if run.shards > 1 else [2, 4, 8]:
        sharded = replace(run, sharding="zero3", shards=shards)
        each = estimate_memory(model, sharded).total
        if each <= estimate_limit(free, sharded):
            where = "on these" if run.shards > 1 else "across"
            return (f"train.sharding: zero3 {where} {shards} GPUs (about {each / GIB:.1f} GiB each"
                    + (f"; NPROC_PER_NODE={shards})" if run.shards == 1 else ")"))
    return ""


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
                    t.gradient_checkpointing, t.optim, plan.sharding, plan.world_size)
