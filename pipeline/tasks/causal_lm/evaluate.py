"""The evaluate stage for task: causal_lm: the base AND the fine-tuned model on exactly the same tokens,
in one metrics file, with the improvement: per split (validation, and test when the data has one),

- loss and perplexity over the non-overlapping blocks (what run_clm.py reports): each block predicts
  block_size - 1 tokens from the tokens before them in the block;
- loss and perplexity with a sliding window (Hugging Face's "Perplexity of fixed-length models"):
  windows of block_size tokens moving by `evaluate.stride` over the split's token stream, each token
  scored exactly once, with at least block_size - stride tokens of context where the text has them
  (in pad mode each document is its own stream and fits one window, so this equals the blocks);
- bits per byte (the summed loss in bits over the UTF-8 bytes of the scored tokens), comparable
  across tokenizers.

Losses are summed per token in fp32 and divided once, so nothing depends on the batch size. It runs
without gradients, under autocast in `evaluate.precision`, with GPT-2's output layer taken chunk by
chunk (pipeline.training.loss.summed_nll). Also writes metrics/perplexity.json for the bar plot.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.common import IGNORE_INDEX, perplexity
from pipeline.core.config import Params
from pipeline.core.device import autocast_dtype, device
from pipeline.core.errors import PipelineError
from pipeline.core.loading import MADE_BY, check_folder, load_model, load_saved_dataset, load_tokenizer
from pipeline.training.loss import TENSOR_CORE_ROWS, pad_vocab, summed_nll

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Scorer = Callable[..., tuple[float, int]]  # (input_ids, labels[, attention_mask]) -> (summed NLL, tokens)

log = logging.getLogger(__name__)


# --- the two ways of scoring ---------------------------------------------------------------------

def make_scorer(model: PreTrainedModel, precision: str) -> Scorer:
    """A function from (input_ids, labels) batches to (summed NLL in nats, scored tokens), for `model`
    made ready once: vocabulary padded (faster output product; the padding takes no part), eval mode,
    on the device, no gradients, autocast in `precision`."""
    import torch

    dev = device()
    vocab = pad_vocab(model, TENSOR_CORE_ROWS)
    model.to(dev).eval()
    dtype = autocast_dtype(precision)

    def score(input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, int]:
        mask = attention_mask.to(dev) if attention_mask is not None else None
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            nll, n = summed_nll(model, input_ids.to(dev), labels.to(dev), vocab, attention_mask=mask)
        return nll.item(), int(n)

    return score


def block_nll(score: Scorer, blocks: Dataset, batch_size: int) -> tuple[float, int]:
    """Summed NLL and predicted tokens over the non-overlapping `blocks`."""
    from transformers import default_data_collator

    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = default_data_collator(list(blocks.select(range(start, min(start + batch_size, len(blocks))))))
        nll, n = score(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        total, count = total + nll, count + n
    return total, count


def token_stream(blocks: Any) -> tuple[Any, Any]:
    """The split as one token stream, and which tokens may be scored (labels not -100). Padding is
    left out (pad mode pads every block; pack mode at most the last), so it is never context: the
    stream is the documents one after another, as in the guide."""
    import numpy as np

    data = blocks.with_format("numpy")
    ids, scored = np.asarray(data["input_ids"]).reshape(-1), np.asarray(data["labels"]).reshape(-1) != IGNORE_INDEX
    if "attention_mask" in blocks.column_names:
        real = np.asarray(data["attention_mask"]).reshape(-1) == 1
        ids, scored = ids[real], scored[real]
    return ids, scored


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, targets) per window, as in Hugging Face's guide: each window ends `stride` tokens
    after the previous one and scores only its last `targets` tokens, those not scored before."""
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        windows.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return windows


def sliding_nll(score: Scorer, ids: np.ndarray, scored: np.ndarray, window: int, stride: int,
                batch_size: int) -> tuple[float, int, np.ndarray]:
    """Summed NLL, number of scored tokens and their mask over the stream `ids`, sliding a
    `window`-token window by `stride`; only tokens where `scored` is true count."""
    import numpy as np
    import torch

    windows = sliding_windows(len(ids), window, stride)
    full = [w for w in windows if w[1] - w[0] == window]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if w[1] - w[0] != window]  # a short last window goes alone
    targets = np.zeros(len(ids), dtype=bool)
    total, count = 0.0, 0
    for batch in batches:
        inputs = torch.tensor(np.stack([ids[b:e] for b, e, _ in batch]), dtype=torch.long)
        labels = inputs.clone()
        for row, (b, e, n) in enumerate(batch):
            labels[row, : e - b - n] = IGNORE_INDEX  # context only: scored by an earlier window
            labels[row, ~torch.from_numpy(scored[b:e])] = IGNORE_INDEX
            targets[max(e - n, b + 1):e] = True  # a window's first token has no context to predict it from
        nll, n = score(inputs, labels)
        total, count = total + nll, count + n
    return total, count, targets & scored


# --- bytes, for bits per byte --------------------------------------------------------------------

def token_bytes(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 bytes per token id: exact for byte-level BPE (GPT-2's: one vocabulary character per
    byte), decoded otherwise; special tokens count 0."""
    import numpy as np
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = set(ByteLevel.alphabet())  # the 256 characters byte-level BPE writes bytes as
    vocab = tokenizer.get_vocab()
    sizes = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    for token, index in vocab.items():
        if index in special:
            continue
        sizes[index] = len(token) if set(token) <= byte_chars else len(tokenizer.decode([index]).encode("utf-8"))
    return sizes


def summarize(nll: float, tokens: int, n_bytes: int | None = None) -> dict[str, float]:
    loss = nll / tokens
    result = {"loss": loss, "perplexity": perplexity(loss)}
    if n_bytes:
        result["bits_per_byte"] = nll / math.log(2) / n_bytes
    return result


def compare(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """How much fine-tuning changed perplexity: positive reduction means it helped."""
    return {"perplexity_reduction": base["perplexity"] - finetuned["perplexity"],
            "perplexity_relative_reduction": 1 - finetuned["perplexity"] / base["perplexity"],
            "perplexity_ratio": finetuned["perplexity"] / base["perplexity"],
            "loss_reduction": base["loss"] - finetuned["loss"]}


# --- the stage -----------------------------------------------------------------------------------

def evaluate_split(paths: dict[str, Path], blocks: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                   stride: int, precision: str, trust_remote_code: bool) -> dict:
    """Both ways of scoring, for every model in `paths`, on one split."""
    import numpy as np

    sizes = token_bytes(tokenizer)
    block_size = len(blocks[0]["input_ids"])
    # pad mode: the model learned each document on its own from position 0, and a document fits its
    # block, so sliding across documents would score contexts it never trains on
    one_document_per_block = "attention_mask" in blocks.column_names
    ids, scored = (None, None) if one_document_per_block else token_stream(blocks)
    data = blocks.with_format("numpy")
    block_ids, block_targets = np.asarray(data["input_ids"])[:, 1:], np.asarray(data["labels"])[:, 1:] != IGNORE_INDEX
    block_bytes = int(sizes[block_ids[block_targets]].sum())
    result: dict[str, Any] = {}
    for name, path in paths.items():
        score = make_scorer(load_model(path, trust_remote_code, made_by=MADE_BY[name]), precision)
        nll, tokens = block_nll(score, blocks, batch_size)
        blocks_summary = summarize(nll, tokens, block_bytes)
        if one_document_per_block:  # a window may not reach into another document: it is the block
            s_tokens, sliding_summary = tokens, blocks_summary
        else:
            s_nll, s_tokens, s_mask = sliding_nll(score, ids, scored, block_size, stride, batch_size)
            sliding_summary = summarize(s_nll, s_tokens, int(sizes[ids[s_mask]].sum()))
        result[name] = {**blocks_summary, **{f"sliding_{k}": v for k, v in sliding_summary.items()}}
        result["tokens"], result["sliding_tokens"] = tokens, s_tokens
        log.info("%s: perplexity %.2f (blocks), %.2f (sliding window, stride %d), %.3f bits/byte over %d tokens",
                 name, result[name]["perplexity"], result[name]["sliding_perplexity"], stride,
                 result[name]["bits_per_byte"], tokens)
    result["bytes"] = block_bytes
    if "base" in result:
        result.update(compare(result["base"], result["finetuned"]))
        result["sliding_perplexity_reduction"] = (result["base"]["sliding_perplexity"]
                                                  - result["finetuned"]["sliding_perplexity"])
    return result


def evaluate(params: Params, base_dir: Path, finetuned_dir: Path, data_dir: Path, precision: str
             ) -> tuple[dict, dict[str, list[dict]]]:
    """metrics/eval.json and the rows of the perplexity plot (the stage's interface)."""
    results = evaluate_models(base_dir, finetuned_dir, data_dir, params.evaluate.batch_size,
                              params.model.trust_remote_code, precision, params.evaluate.stride)
    return results, {"perplexity": perplexity_rows(results)}


def evaluate_models(base_dir: Path, finetuned_dir: Path, data_dir: Path, batch_size: int, trust_remote_code: bool,
                    precision: str = "fp32", stride: int | None = None) -> dict:
    for name, path in (("base", base_dir), ("finetuned", finetuned_dir)):  # both, before minutes on the first
        check_folder(path, MADE_BY[name])
    processed = load_saved_dataset(data_dir, "preprocess")
    block_size = len(processed["validation"][0]["input_ids"])
    stride = stride or block_size // 2
    if stride > block_size:
        raise PipelineError(f"params: evaluate.stride ({stride}) exceeds the blocks' {block_size} tokens; lower it")
    tokenizer = load_tokenizer(finetuned_dir, trust_remote_code, "train")
    results: dict[str, Any] = {"precision": precision, "block_size": block_size, "stride": stride}
    for split in [s for s in ("validation", "test") if s in processed]:
        results[split] = evaluate_split({"base": base_dir, "finetuned": finetuned_dir}, processed[split], tokenizer,
                                        batch_size, stride, precision, trust_remote_code)
        if results[split]["perplexity_reduction"] < 0:
            log.warning("fine-tuning made %s perplexity worse (%.2f -> %.2f); try a lower lr or fewer epochs", split,
                        results[split]["base"]["perplexity"], results[split]["finetuned"]["perplexity"])
    return results


def perplexity_rows(results: dict) -> list[dict]:
    """Rows of the base-vs-fine-tuned bar plot (dvc plots)."""
    return [{"model": f"{name} ({split})", "perplexity": results[split][name]["perplexity"]}
            for split in ("validation", "test") if split in results for name in ("base", "finetuned")]
