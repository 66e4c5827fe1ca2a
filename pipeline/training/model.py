"""The model as it will train: dropout, padded vocabulary, frozen parts or LoRA adapters, the loss it
computes (prepare_model), and what the rest of the stage asks of it (its layers, its parameters). How it
will run is decided in pipeline.training.plan, attention and memory."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.loading import load_config, load_model
from pipeline.core.params import shorten
from pipeline.training.loss import causal_lm_loss, loss_without_logits, pad_vocab

if TYPE_CHECKING:
    from peft import PeftModel
    from torch.nn import Module
    from transformers import PretrainedConfig, PreTrainedModel

    from pipeline.core.config import LoraSettings

    Model = PreTrainedModel | PeftModel  # a transformers model, or one with LoRA adapters around it

CAUSAL_SDPA = "sdpa_causal"  # sdpa, always causal, no mask (causal_sdpa)


def prepare_model(t: TrainConfig, trust: bool, base_dir: Path, pad_token_id: int, labels: list[str] | None = None
                  ) -> tuple[Model, int]:
    """The model as it will train (dropout, padded vocabulary, frozen parts or adapters, its loss, the
    tokenizer's pad token) and its real vocabulary size. With `labels`, a sequence classifier over them
    (task: classification), its head new; the pad token may then be one the tokenizer just gained."""
    overrides = dropout_overrides(load_config(base_dir, trust, "download"), t.dropout)
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}} if labels else {}
    model = load_model(base_dir, trust, config_overrides={**overrides, "pad_token_id": pad_token_id, **head},
                       made_by="download", task="classification" if labels else "causal_lm", new_head=True)
    if getattr(model, "generation_config", None) is not None:  # GPT-2 has no pad token: EOS stands in
        model.generation_config.pad_token_id = pad_token_id
    if model.get_input_embeddings().weight.shape[0] <= pad_token_id:  # a pad token of its own (classification)
        model.resize_token_embeddings(pad_token_id + 1, mean_resizing=False)
    vocab = pad_vocab(model, t.pad_vocab_multiple_of)
    freeze(model, t.freeze.embeddings, t.freeze.layers)
    if t.lora.enabled:
        model = add_lora(model, t.lora, "SEQ_CLS" if labels else "CAUSAL_LM")
    if t.gradient_checkpointing:
        model.config.use_cache = False
    if labels:
        return model, vocab  # its own loss: cross-entropy over the labels (weighted: tasks.classification.train)
    base = without_adapters(model)
    # transformers 5 names no loss type for GPT2LMHeadModel; without "ForCausalLM" the Trainer counts position 0
    # of every block as a target and scales train and eval losses by (T-1)/T
    base.loss_type = "ForCausalLM"
    base.loss_function = causal_lm_loss(vocab)  # the padding rows out of the loss, computed inside the model
    loss_without_logits(base)
    skip_padding_check(base)
    return model, vocab


def skip_padding_check(model: PreTrainedModel) -> None:
    """Ask no forward of `model` whether its batch may be padded. Given no attention mask, transformers
    looks for the pad token in every batch on the host (`pad_token_id in input_ids`, a device-to-host sync
    per forward) to warn that a mask may be missing; the stage's blocks have their padding on the right,
    after every real token, and out of the loss, so a causal LM needs none. The pad token stays in the
    config (the Trainer aligns it with the tokenizer's anyway) and in the generation config."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):  # GPT-2: the LM and its transformer each have the check
            module.warn_if_padding_and_no_attention_mask = lambda input_ids, attention_mask: None


def causal_sdpa(model: Model) -> None:
    """Train a causal LM on sdpa's causal kernel alone, with no mask built from the batch. transformers builds
    each forward's mask from the batch: without an attention mask it checks the positions for packed
    sequences, in eager mode by reading the answer on the host (a device-to-host sync per forward), under
    torch.compile by building a B x T x T mask that keeps sdpa off its flash kernel; with one, it reads
    whether any token is padding. The stage's blocks restart no positions, and their padding is on the
    right, after every real token, and out of the loss, so causal attention alone gives the same loss.
    transformers builds no mask for an attention function registered under a name of its own; the saved
    model does not keep it (batched generation pads on the left and needs its mask)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    base = without_adapters(model)
    if not plainly_causal(base.config):  # its mask carries more than causality: keep transformers' sdpa
        return
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    base.set_attn_implementation(CAUSAL_SDPA)


def plainly_causal(config: PretrainedConfig) -> bool:
    """Whether every layer attends to every earlier token (GPT-2, Llama): no sliding window (Mistral), no
    layers of another kind (Gemma's local ones), which only the mask transformers builds would carry."""
    kinds = getattr(config, "layer_types", None) or []
    return not getattr(config, "sliding_window", None) and all(kind == "full_attention" for kind in kinds)


def dropout_overrides(config: PretrainedConfig, dropout: float | None) -> dict[str, float]:
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


def transformer_layers(model: Model) -> list[Module]:
    """The transformer blocks of a causal LM (GPT-2's h, Llama-style layers, ...)."""
    base = without_adapters(model)
    inner = getattr(base, base.base_model_prefix, base)
    for name in ("h", "layers", "blocks"):
        if hasattr(inner, name):
            return list(getattr(inner, name))
    raise PipelineError(f"cannot find the transformer blocks of {type(base).__name__}; set train.freeze.layers: 0")


def without_adapters(model: Model) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (the model itself without LoRA)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_embeddings(model: Model) -> list[Module]:
    base = without_adapters(model)
    inner = getattr(base, base.base_model_prefix, base)
    return [inner.wpe] if hasattr(inner, "wpe") else []


def freeze(model: Model, embeddings: bool, layers: int) -> None:
    """Keep the embeddings and/or the first `layers` transformer blocks fixed."""
    found = transformer_layers(model)
    if layers > len(found):
        raise PipelineError(f"params: train.freeze.layers ({layers}) exceeds the model's {len(found)} blocks")
    frozen = [*found[:layers], *([model.get_input_embeddings(), *position_embeddings(model)] if embeddings else [])]
    for module in frozen:
        module.requires_grad_(False)


def add_lora(model: PreTrainedModel, cfg: LoraSettings, task_type: str = "CAUSAL_LM") -> PeftModel:
    """LoRA adapters on cfg.target_modules; for a classifier (task_type SEQ_CLS) peft trains its head in full."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    linear = linear_layers(model)
    problem = target_problem(model, cfg.target_modules, linear)  # before peft adapts some of them and fails
    if problem:
        raise PipelineError(problem)
    # GPT-2's layers are Conv1D (weights stored transposed); peft needs to be told, or it warns and guesses
    targets = [m for name, m in model.named_modules() if name.split(".")[-1] in cfg.target_modules]
    transposed = bool(targets) and all(isinstance(m, Conv1D) for m in targets)
    width = min((min(m.weight.shape) for m in targets), default=None)
    if width is not None and cfg.r >= width:  # a rank-r update of a narrower layer is a full-rank copy of it
        raise PipelineError(f"params: train.lora.r ({cfg.r}) is not below the width of the layers it adapts "
                            f"({width}); lower it, or set lora.enabled: false to train every weight")
    try:
        peft_model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=list(cfg.target_modules), task_type=task_type,
                                                      fan_in_fan_out=transposed))
    except ValueError as e:
        raise PipelineError(f"params: train.lora.target_modules {cfg.target_modules} do not fit this model "
                            f"({one_line(str(e), 150)}); name some of its linear layers instead: "
                            f"{', '.join(linear)}") from None
    # checkpoints and the saved adapter hold the adapters alone: LoRA leaves the embeddings as they were, and
    # peft would otherwise copy them into every checkpoint because vocabulary padding changed their size
    peft_model.save_pretrained = partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


def has_weight_matrix(module: Module) -> bool:
    """Whether a module has a weight matrix (a linear, convolution or embedding layer), which LoRA can adapt
    with a low-rank update; a LayerNorm, an attention or a block of layers has none."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() >= 2


def linear_layers(model: PreTrainedModel) -> list[str]:
    """The names of the linear layers of a model's body, which LoRA adapts (GPT-2's Conv1D c_attn, c_proj,
    c_fc); the output layer and a classifier's head, outside the body, left out."""
    from torch.nn import Linear
    from transformers.pytorch_utils import Conv1D

    body = getattr(model, model.base_model_prefix, model)
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in body.named_modules()
                              if isinstance(module, (Linear, Conv1D))))


def target_problem(model: PreTrainedModel, targets: list[str], linear: list[str]) -> str | None:
    """The first of `targets` LoRA cannot adapt, in a line naming what it is and the `linear` layers there
    are (peft's own error lists every kind of layer it knows); None if each names layers with a weight
    matrix. A target names every module whose name is it or ends in "." + it, as peft matches them."""
    modules = list(model.named_modules())
    for target in targets:
        found = [module for name, module in modules if name == target or name.endswith("." + target)]
        other = next((module for module in found if not has_weight_matrix(module)), None)
        if found and other is None:
            continue
        what = (f"is a {type(other).__name__}, which LoRA cannot adapt" if found
                else f"names no layer of {type(model).__name__}")
        return (f"params: train.lora.target_modules: {shorten(target)} {what}; name some of its linear layers "
                f"instead: {', '.join(linear)}")
    return None


def count_parameters(model: Model, vocab: int) -> tuple[int, int]:
    """Total and trainable parameters, not counting vocabulary padding rows."""
    params = list(model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    embeddings = model.get_input_embeddings().weight
    padding = (embeddings.shape[0] - vocab) * embeddings.shape[1]
    return total - padding, trainable - (padding if embeddings.requires_grad else 0)
