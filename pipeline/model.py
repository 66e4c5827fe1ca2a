"""The model as it will train: dropout, padded vocabulary, frozen parts or LoRA adapters, the loss it
computes (prepare_model); and the rules behind its attention implementation and torch.compile."""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError
from pipeline.config import TrainConfig
from pipeline.device import autocast_dtype
from pipeline.loading import load_config, load_model
from pipeline.loss import causal_lm_loss, pad_vocab

log = logging.getLogger("pipeline.model")


def prepare_model(t: TrainConfig, trust: bool, base_dir: Path, pad_token_id: int) -> tuple[Any, int]:
    """The model as it will train (dropout, padded vocabulary, frozen parts or adapters, its loss, the
    tokenizer's pad token) and its real vocabulary size."""
    overrides = dropout_overrides(load_config(base_dir, trust, "download"), t.dropout)
    model = load_model(base_dir, trust, config_overrides={**overrides, "pad_token_id": pad_token_id},
                       made_by="download")
    if model.generation_config is not None:  # GPT-2 has no pad token: EOS stands in (pipeline.loading.load_tokenizer)
        model.generation_config.pad_token_id = pad_token_id
    vocab = pad_vocab(model, t.pad_vocab_multiple_of)
    freeze(model, t.freeze.embeddings, t.freeze.layers)
    if t.lora.enabled:
        model = add_lora(model, t.lora)
    if t.gradient_checkpointing:
        model.config.use_cache = False
    base = without_adapters(model)
    # transformers 5 names no loss type for GPT2LMHeadModel; without "ForCausalLM" the Trainer counts position 0
    # of every block as a target and scales train and eval losses by (T-1)/T
    base.loss_type = "ForCausalLM"
    base.loss_function = causal_lm_loss(vocab)  # the padding rows out of the loss, computed inside the model
    return model, vocab


def dropout_overrides(config: Any, dropout: float | None) -> dict[str, float]:
    """Config fields that set dropout (GPT-2: resid_pdrop, embd_pdrop, attn_pdrop; others: *_dropout),
    all set to `dropout`; empty for None (keep the model's own). Given to from_pretrained, so every
    module is built with them."""
    if dropout is None:
        return {}
    names = [k for k, v in config.to_dict().items()
             if isinstance(v, float) and re.search(r"(pdrop|dropout|dropout_prob|dropout_rate)$", k)]
    if not names:
        raise PipelineError(f"train.dropout is set but {type(config).__name__} has no dropout field to set; "
                            "remove train.dropout")
    return dict.fromkeys(names, dropout)


def blocks(model: Any) -> list:
    """The transformer blocks of a causal LM (GPT-2's h, Llama-style layers, ...)."""
    base = without_adapters(model)
    inner = getattr(base, base.base_model_prefix, base)
    for name in ("h", "layers", "blocks"):
        if hasattr(inner, name):
            return list(getattr(inner, name))
    raise PipelineError(f"cannot find the transformer blocks of {type(base).__name__}; set train.freeze.layers: 0")


def without_adapters(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself without LoRA)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_embeddings(model: Any) -> list:
    base = without_adapters(model)
    inner = getattr(base, base.base_model_prefix, base)
    return [inner.wpe] if hasattr(inner, "wpe") else []


def freeze(model: Any, embeddings: bool, layers: int) -> None:
    """Keep the embeddings and/or the first `layers` transformer blocks fixed."""
    found = blocks(model)
    if layers > len(found):
        raise PipelineError(f"params: train.freeze.layers ({layers}) exceeds the model's {len(found)} blocks")
    frozen = [*found[:layers], *([model.get_input_embeddings(), *position_embeddings(model)] if embeddings else [])]
    for module in frozen:
        module.requires_grad_(False)


def add_lora(model: Any, cfg: Any) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's layers are Conv1D (weights stored transposed); peft needs to be told, or it warns and guesses
    targets = [m for name, m in model.named_modules() if name.split(".")[-1] in cfg.target_modules]
    transposed = bool(targets) and all(isinstance(m, Conv1D) for m in targets)
    width = min((min(m.weight.shape) for m in targets if getattr(m, "weight", None) is not None), default=None)
    if width is not None and cfg.r >= width:  # a rank-r update of a narrower layer is a full-rank copy of it
        raise PipelineError(f"params: train.lora.r ({cfg.r}) is not below the width of the layers it adapts "
                            f"({width}); lower it, or set lora.enabled: false to train every weight")
    try:
        peft_model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                                                      fan_in_fan_out=transposed))
    except ValueError as e:
        raise PipelineError(f"params: train.lora.target_modules {cfg.target_modules} do not fit this model "
                            f"({str(e).splitlines()[0]}); name its linear layers") from None
    # checkpoints and the saved adapter hold the adapters alone: LoRA leaves the embeddings as they were, and
    # peft would otherwise copy them into every checkpoint because vocabulary padding changed their size
    peft_model.save_pretrained = partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


def count_parameters(model: Any, vocab: int) -> tuple[int, int]:
    """Total and trainable parameters, not counting vocabulary padding rows."""
    params = list(model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    embeddings = model.get_input_embeddings().weight
    padding = (embeddings.shape[0] - vocab) * embeddings.shape[1]
    return total - padding, trainable - (padding if embeddings.requires_grad else 0)


def position_parameters(model: Any) -> int:
    return sum(p.numel() for module in position_embeddings(model) for p in module.parameters())


# --- attention -------------------------------------------------------------------------------------

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


def auto_attention(device: str, precision: str) -> str | None:
    """The choice `auto` makes without measuring, or None where it measures. On CUDA nothing is run:
    flash_attention_2 where installed (16-bit), else sdpa (PyTorch's flash and memory-efficient kernels).
    Timing eager attention there would run the B x heads x T^2 score matrices at the training batch:
    tens of GiB on a GPT-2 (it ran gpt2-medium at batch 16 out of memory on an 80 GB H100). On a CPU,
    eager and sdpa are close and either can win, so it measures, at one block."""
    if device == "cuda":
        return "flash_attention_2" if flash_attention_installed() and precision != "fp32" else "sdpa"
    return None


def fastest_attention(model: Any, batch: Any, precision: str, trials: int = 2) -> tuple[str, dict[str, float]]:
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


# --- torch.compile ---------------------------------------------------------------------------------

# torch.compile costs a fixed time up front and then saves a part of every step. On one H100 (2026-11-23,
# torch 2.11) it took GPT-2 124M from 135k to 205k tokens/s with the loss outside the compiled region, and a
# Trainer with the loss inside from 132k to 250k-375k: a token costs ~4 us less. The compile time itself was
# not recorded there; if it is ~40 s, it is won back after ~10M tokens, and half of it after ~5M.
COMPILE_MIN_TOKENS = 5_000_000


def use_compile(requested: bool | str, device: str, planned_tokens: int) -> tuple[bool, str]:
    """Whether to torch.compile, and why. `auto`: on CUDA, for runs of at least COMPILE_MIN_TOKENS
    tokens; never on a CPU, where it made GPT-2 124M slower (274 vs 318 tokens/s on 2 cores,
    2026-11-22)."""
    if requested != "auto":
        return bool(requested), "train.torch_compile"
    if device != "cuda":
        return False, "auto: off on CPU"
    if planned_tokens < COMPILE_MIN_TOKENS:
        return False, f"auto: {planned_tokens / 1e6:.1f}M tokens planned, it pays from {COMPILE_MIN_TOKENS / 1e6:.0f}M"
    return True, f"auto: CUDA, {planned_tokens / 1e6:.1f}M tokens planned"
