"""Speed and memory arithmetic for the train stage: FLOPs per token and MFU, the device's peak
(a table for known GPUs, a measured matmul otherwise), a peak-memory estimate for the preflight,
the memory actually used, and the attention implementation measured rather than assumed."""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from typing import Any

from pipeline.common import PipelineError

log = logging.getLogger("pipeline.train")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets; fp32 falls back to a measurement.
GPU_PEAK_16BIT = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 756e12,
                  "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "A10": 125e12, "L4": 121e12, "V100": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}
GIB = 1024**3


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate (PaLM appendix B): 6N for the weights' forward and
    backward, 12·L·d·T for attention."""
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def measured_matmul_flops(dtype_name: str, size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in this precision on this device: the achievable peak."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
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


# --- memory ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    static: int        # weights, gradients, optimizer states
    activations: int   # saved for backward, for one micro-batch
    logits: int        # the vocabulary-wide output and its gradient

    @property
    def total(self) -> int:
        return self.static + self.activations + self.logits


def estimate_memory(n_params: int, n_trainable: int, n_layer: int, n_embd: int, n_head: int, vocab: int,
                    batch: int, block_size: int, precision: str, gradient_checkpointing: bool,
                    attention: str, loss_chunk_tokens: int = 0) -> MemoryEstimate:
    """Peak training memory, the usual accounting (Korthikanti et al. 2022 for activations):

    - fp32 master weights 4 bytes/param; trainable ones add a 4-byte gradient and 8 bytes of AdamW
      states, and in mixed precision ~2 bytes of 16-bit weight copies: 16-18 bytes per trainable param;
    - activations per layer ≈ B·T·d·34 bytes in 16-bit (x2 in fp32), plus 5·heads·T²·B for eager
      attention's score matrices; gradient checkpointing keeps only each layer's input (B·T·d·2)
      and one layer's full set;
    - logits: B·T·V in 16-bit, their fp32 copy and its gradient; with the chunked loss, one chunk's
      worth plus an fp32 gradient of the output matrix.
    """
    width = 2 if precision in ("bf16", "fp16") else 4
    static = 4 * n_params + (4 + 8 + (2 if width == 2 else 0)) * n_trainable
    tokens = batch * block_size
    per_layer = tokens * n_embd * 34 * width // 2
    if attention == "eager":
        per_layer += 5 * n_head * block_size * block_size * batch * width // 2
    activations = (n_layer * tokens * n_embd * width + per_layer) if gradient_checkpointing else n_layer * per_layer
    logits = tokens * vocab * (width + 4 + 4)
    if loss_chunk_tokens:
        logits = min(tokens, loss_chunk_tokens) * vocab * (width + 4 + 4) + 4 * vocab * n_embd
    return MemoryEstimate(static, activations, logits)


def free_memory() -> tuple[int, str]:
    """Bytes free on the training device, and its name."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, torch.cuda.get_device_name()
    import psutil

    return psutil.virtual_memory().available, "CPU RAM"


def preflight(estimate: MemoryEstimate, batch: int, accumulation: int, gradient_checkpointing: bool,
              lora: bool, loss_chunked: bool = True, headroom: float = 0.9) -> None:
    """Fail fast, with what to change, when the estimate exceeds the free memory."""
    free, where = free_memory()
    log.info("memory preflight: estimated peak %.2f GiB (states %.2f, activations %.2f, logits %.2f); %.2f GiB free "
             "on %s", estimate.total / GIB, estimate.static / GIB, estimate.activations / GIB, estimate.logits / GIB,
             free / GIB, where)
    if estimate.total <= headroom * free:
        return
    fixes = []
    if batch > 1:
        fixes.append(f"train.per_device_train_batch_size: {max(1, batch // 2)} with gradient_accumulation_steps: "
                     f"{accumulation * 2} (same effective batch)")
    if not loss_chunked and estimate.logits > 0.1 * estimate.total:
        fixes.append("train.loss_chunk_tokens: 1024")
    if not gradient_checkpointing:
        fixes.append("train.gradient_checkpointing: true")
    if not lora:
        fixes.append("train.lora.enabled: true")
    hint = "; or ".join(fixes) if fixes else "a device with more memory, or sharding (FSDP/DeepSpeed)"
    raise PipelineError(f"training needs about {estimate.total / GIB:.1f} GiB but {where} has {free / GIB:.1f} GiB "
                        f"free (states {estimate.static / GIB:.1f}, activations {estimate.activations / GIB:.1f}, "
                        f"logits {estimate.logits / GIB:.1f}); try {hint}")


def peak_memory_used() -> tuple[int, str]:
    """The run's peak: CUDA allocator peak on GPU, process peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


# --- attention -----------------------------------------------------------------------------------

def available_attention() -> list[str]:
    import importlib.util

    import torch

    names = ["sdpa", "eager"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    return names


def check_attention(requested: str) -> None:
    if requested not in ("auto", *available_attention()):
        raise PipelineError(f"train.attn_implementation={requested} needs a CUDA GPU and the flash-attn package "
                            "(pip install flash-attn); use sdpa, eager or auto")


def fastest_attention(model: Any, batch: Any, precision: str, trials: int = 2) -> tuple[str, dict[str, float]]:
    """Time a forward+backward of one real batch under each available attention implementation and
    return the fastest with the timings. Gradients, RNG state and train/eval mode are left as they were.

    One untimed warm-up each, then `trials` rounds that take the implementations in turn, keeping each
    one's fastest time: on a shared machine a burst of load then slows one round, not one contender."""
    import torch

    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if device_type == "cuda" else None
    # in training mode, as the steps will run: dropout is part of the cost (with dropout, sdpa on CPU
    # leaves its fused kernel), and from_pretrained hands the model over in eval mode
    was_training = model.training
    model.train()

    def seconds(name: str) -> float:
        model.set_attn_implementation(name)
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            model(**batch).loss.backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = available_attention()
    for name in names:
        seconds(name)  # warm-up: kernels, allocator
    timings = {name: math.inf for name in names}
    for _ in range(trials):
        for name in names:
            timings[name] = min(timings[name], seconds(name))
    model.train(was_training)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    fastest = min(timings, key=timings.get)
    # keep sdpa (PyTorch's default) unless another is clearly faster, so close timings do not flip the
    # choice, and with it the last bits of the results, from run to run
    best = fastest if timings[fastest] < 0.9 * timings.get("sdpa", math.inf) else "sdpa"
    model.set_attn_implementation(best)
    return best, timings


def pad_vocab(model: Any, multiple: int) -> int:
    """Pad the (tied) embedding/output matrix to a multiple of `multiple` rows for faster matmuls (here
    GPT-2's 2048 x 768 x 50257 output product ran ~15% faster at 50304); returns the real size. The
    padding rows are never inputs and next_token_loss leaves them out, so they change nothing."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if multiple and vocab % multiple:
        model.resize_token_embeddings(vocab, pad_to_multiple_of=multiple, mean_resizing=False)
    return vocab


# --- loss ------------------------------------------------------------------------------------------

LOSS_CHUNK = 1024  # tokens per chunk of the output layer + cross-entropy


def next_token_loss(model: Any, unwrapped: Any, input_ids: Any, labels: Any, vocab: int,
                    chunk: int = LOSS_CHUNK, attention_mask: Any = None) -> tuple[Any, Any, Any]:
    """Summed next-token cross-entropy of a causal LM over a batch, the number of predicted tokens, and
    the model outputs. `model` is what to call (maybe DDP-wrapped), `unwrapped` the model itself, `vocab`
    the real vocabulary size (the output matrix may be padded beyond it), `chunk` the tokens per chunk
    (0: the full logits, as Hugging Face computes them).

    GPT-2's logits are a plain product with the (tied) embedding matrix, so for it the loss is taken
    chunk by chunk from the final hidden states, never holding B x T x V logits (a padded vocabulary's
    extra rows are left out). Other architectures may shape their logits (scaling, soft-capping): for
    them the loss is taken from the logits they return."""
    import torch.nn.functional as F

    targets = labels[:, 1:].reshape(-1)
    if chunk and unwrapped.config.model_type == "gpt2":
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1)
        hidden = outputs.hidden_states[-1][:, :-1]
        total, count = chunked_cross_entropy(hidden.reshape(-1, hidden.size(-1)),
                                             unwrapped.get_output_embeddings().weight, targets, vocab, chunk)
        return total, count, outputs
    outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = outputs.logits[:, :-1, :vocab].float()
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum(), outputs


def chunked_cross_entropy(hidden: Any, weight: Any, targets: Any, vocab: int, chunk: int) -> tuple[Any, Any]:
    """Summed next-token cross-entropy of `hidden` (N, d) against the output matrix `weight` (V', d),
    without materialising all N x V logits: chunk by chunk, the logits, their log-sum-exp and (when
    gradients are on) the gradients for `hidden` and `weight` are computed and the logits dropped.
    Only the first `vocab` rows count (the rest is padding). Returns (loss sum, number of targets)."""
    import torch

    count = (targets != -100).sum()
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):  # evaluation
        return _chunked_forward(hidden, weight, targets, vocab, chunk, grads=False)[0], count
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, vocab, chunk), count


def _chunked_forward(hidden: Any, weight: Any, targets: Any, vocab: int, chunk: int, grads: bool) -> tuple:
    import torch

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        logits = (h @ weight.t())[:, :vocab].float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = t != -100
        t = t.clamp(min=0)
        total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
        if grads:  # d(sum of -log softmax[target]) / d logits = softmax - one_hot, zero for ignored rows
            g = torch.exp_(logits.sub_(lse[:, None]))
            g[torch.arange(len(t), device=g.device), t] -= 1
            g.mul_(valid[:, None])
            g = g.to(h.dtype)
            grad_hidden[start:start + chunk] = g @ weight[:vocab]
            grad_weight[:vocab] += (g.t() @ h).float()
    return total, grad_hidden, grad_weight


class _ChunkedCrossEntropy:  # a torch.autograd.Function, built on first use so torch loads lazily
    _fn = None

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if cls._fn is None:
            import torch

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, vocab: int, chunk: int) -> Any:
                    total, grad_hidden, grad_weight = _chunked_forward(hidden, weight, targets, vocab, chunk, True)
                    ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
                    return total

                @staticmethod
                def backward(ctx: Any, grad: Any) -> tuple:
                    grad_hidden, grad_weight = ctx.saved_tensors
                    return grad_hidden * grad.to(grad_hidden.dtype), grad_weight * grad.to(grad_weight.dtype), \
                        None, None, None

            cls._fn = Function
        return cls._fn.apply(*args)
