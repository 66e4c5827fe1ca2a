"""Helpers of the tests and the bench that the pipeline itself does not use: params sections of the
project's params.yaml with changes, the memory shape of a GPT-2 size without building it, the
evaluate stage's token NLL for a freshly loaded model, and an alias bomb."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pipeline.core.params import project_params
from pipeline.training.memory.estimate import ModelShape

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

# six anchors, each a list of ten of the one before: 10^6 values once expanded, a few lines of YAML
ALIAS_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 10 if p else ['x'] * 10)}]\n"
                     for p, k in zip(["", "a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e", "f"], strict=True))


def project_section(path: str, **changes: Any) -> Any:
    """A section of the project's params.yaml ("data", "train.lora", ...) with `changes`: the tests and
    the bench start from the same values as the pipeline."""
    node: Any = project_params()
    for part in path.split("."):
        node = getattr(node, part)
    return dataclasses.replace(node, **changes)


GPT2_SIZES = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
              "gpt2-xl": (48, 1600, 25)}  # n_layer, n_embd, n_head


def gpt2_shape(size: str, vocab: int = 50304, lora_r: int = 0, positions: int = 1024) -> ModelShape:
    """The ModelShape of a GPT-2 size without building it (profiles, the bench): full fine-tuning, or
    LoRA of rank `lora_r` on c_attn, c_proj and c_fc."""
    n_layer, d, heads = GPT2_SIZES[size]
    block = 12 * d * d + 13 * d
    total = vocab * d + positions * d + n_layer * block + 2 * d
    # rank x (in + out) of c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d), mlp.c_proj (4d -> d)
    adapters = n_layer * lora_r * 16 * d
    return ModelShape(total + adapters, adapters or total, block, n_layer, d, heads, vocab, 7 * d if lora_r else 0)


def token_nll(model: PreTrainedModel, blocks: Dataset, batch_size: int, precision: str = "fp32") -> tuple[float, int]:
    """The evaluate stage's summed NLL over `blocks` and the tokens scored, for a freshly loaded model
    (its output matrix is padded in place)."""
    from pipeline.tasks.causal_lm.evaluate import block_nll, make_scorer

    return block_nll(make_scorer(model, precision), blocks, batch_size)
