"""Labels predicted, for the evaluate and generate stages with task: classification: the fine-tuned
classifier's probabilities, and two baselines that say whether fine-tuning paid: the majority class of
the training split, and the base language model zero-shot, which scores each label's name as the
continuation of classify.zero_shot_prompt around the text and answers the likeliest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.device import autocast_dtype, device

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def probabilities(model: PreTrainedModel, blocks: Dataset, batch_size: int, precision: str) -> np.ndarray:
    """The classifier's label probabilities for every block, one row each."""
    import numpy as np
    import torch
    from transformers import default_data_collator

    dev = device()
    model.to(dev).eval()
    autocast = autocast_dtype(precision)
    columns = [c for c in ("input_ids", "attention_mask", "position_ids") if c in blocks.column_names]
    rows = []
    with torch.inference_mode(), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        for start in range(0, len(blocks), batch_size):
            batch = default_data_collator([{c: blocks[i][c] for c in columns}
                                           for i in range(start, min(start + batch_size, len(blocks)))])
            logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits.float()
            rows.append(torch.softmax(logits, -1).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, model.config.num_labels))


def texts_of(blocks: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts of the blocks back from their tokens: the real tokens only, without a trailing EOS."""
    out = []
    for ids, mask in zip(blocks["input_ids"], blocks["attention_mask"], strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m]
        if real and real[-1] == tokenizer.eos_token_id:
            real = real[:-1]
        out.append(tokenizer.decode(real))
    return out


def zero_shot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], names: list[str],
              prompt: str, context: int | None, batch_size: int, precision: str) -> np.ndarray:
    """The base language model's answer per text: the label whose name (after a space) is the likeliest
    continuation of `prompt` (with {text}), its log-probability summed over its tokens. A text too long
    for the context keeps its beginning."""
    import numpy as np
    import torch

    dev = device()
    model.to(dev).eval()
    autocast = autocast_dtype(precision)
    before, after = prompt.split("{text}", 1)
    head, tail = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in (before, after))
    choices = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in names]
    left = (context or 10**9) - len(head) - len(tail) - max(map(len, choices))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = []  # (text index, label, ids, where the label starts)
    for i, text in enumerate(texts):
        ids = head + tokenizer(text, add_special_tokens=False)["input_ids"][:max(left, 0)] + tail
        sequences += [(i, j, ids + choice, len(ids)) for j, choice in enumerate(choices)]
    scores = np.full((len(texts), len(names)), -np.inf)
    keep = max(map(len, choices)) + 1  # the logits of the label's tokens only: left-padded, they end every row
    with torch.inference_mode(), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(ids) for _, _, ids, _ in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, _, ids, _ in chunk], device=dev)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids, _ in chunk], device=dev)
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # GPT-2's positions start at the text, not the padding
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits.float()
            logprobs = torch.log_softmax(logits, -1)
            for row, (i, j, ids, begin) in enumerate(chunk):
                label = torch.arange(width - (len(ids) - begin), width, device=dev)  # its tokens, at the end
                scores[i, j] = logprobs[row, label - 1 - (width - keep), input_ids[row, label]].sum().item()
    return scores.argmax(1) if len(texts) else np.zeros(0, dtype=np.int64)
