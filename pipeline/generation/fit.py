"""Whether prompts and max_new_tokens fit a model's context: a check of the train stage's samples and of
the generate stage, before any sampling starts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def check_prompts_fit(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                      context: int | None, key: str) -> None:
    """Prompts and max_new_tokens (of the params section `key`) that fit the model's context: an error
    where none can, a warning where a long prompt leaves fewer new tokens than asked."""
    if context is None:
        return
    if max_new_tokens >= context:
        raise PipelineError(f"params: {key}.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                            f"model's {context}-token context; set it below {context}")
    lengths = [len(ids) for ids in tokenizer([p or tokenizer.eos_token for p in prompts],
                                             add_special_tokens=False)["input_ids"]] or [0]
    if max(lengths) >= context:
        raise PipelineError(f"params: {key}.prompts: a prompt of {max(lengths)} tokens fills the model's "
                            f"{context}-token context; shorten it")
    if max(lengths) + max_new_tokens > context:
        log.warning("%s.max_new_tokens %d is cut to %d for the longest prompt (%d tokens): the model's context is %d "
                    "tokens", key, max_new_tokens, context - max(lengths), max(lengths), context)
