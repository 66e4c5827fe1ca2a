"""pipeline/evaluate.py: token-weighted loss, the sliding window against Hugging Face's guide, bits
per byte, base vs fine-tuned on the same tokens, every split."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch

from pipeline.core.common import IGNORE_INDEX
from pipeline.core.loading import load_model, load_tokenizer
from pipeline.core.outputs import write_manifest
from pipeline.tasks.causal_lm.evaluate import (
    block_nll,
    compare,
    evaluate_models,
    evaluate_split,
    make_scorer,
    perplexity_rows,
    sliding_nll,
    sliding_windows,
    summarize,
    token_bytes,
    token_stream,
)
from tests.support import token_nll


def blocks(rows: list[list[int]], labels: list[list[int]] | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": labels or rows})


def reference_nll(model, rows, labels):
    """Straight from the definition: -log p(token | prefix), one token at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labs in zip(rows, labels, strict=True):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if labs[t] != IGNORE_INDEX:
                    total -= logp[t - 1, labs[t]].item()
                    count += 1
    return total, count


def test_token_nll_matches_the_definition_and_ignores_padding(pipeline_outputs):
    rows = [[464, 7850, 318, 257, 1295, 13], [32, 983, 286, 19780, 50256, 50256]]
    labels = [rows[0], [32, 983, 286, 19780, IGNORE_INDEX, IGNORE_INDEX]]
    nll, count = token_nll(load_model(pipeline_outputs / "models/finetuned"), blocks(rows, labels), batch_size=2)
    ref_nll, ref_count = reference_nll(load_model(pipeline_outputs / "models/finetuned"), rows, labels)
    assert count == ref_count == 5 + 3
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_loss_does_not_depend_on_batch_size(pipeline_outputs):
    val = datasets.load_from_disk(str(pipeline_outputs / "data/processed"))["validation"]
    score = make_scorer(load_model(pipeline_outputs / "models/finetuned"), "fp32")
    (one, n1), (many, n2) = block_nll(score, val, 1), block_nll(score, val, 5)
    assert n1 == n2 == len(val) * 31
    assert one == pytest.approx(many, rel=1e-5)


def guide_sliding_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's "Perplexity of fixed-length models", its loop as published, except that it sums
    the per-token losses instead of weighting each window's mean by its target count minus one (the
    guide's comment notes the shift; for every window after the first the model scores all
    `trg_len` targets, so that weighting is off by one token per window)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits
        losses = torch.nn.functional.cross_entropy(logits[0, :-1].double(), target_ids[0, 1:], ignore_index=-100,
                                                   reduction="sum")
        nll_sum += losses.item()
        n_tokens += int((target_ids[0, 1:] != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_sliding_window_matches_the_guide(pipeline_outputs, stride):
    val = datasets.load_from_disk(str(pipeline_outputs / "data/processed"))["validation"]
    ids, scored = token_stream(val)
    model = load_model(pipeline_outputs / "models/finetuned")
    reference, n_tokens = guide_sliding_perplexity(model, torch.tensor(ids[None], dtype=torch.long), 32, stride)
    nll, count, mask = sliding_nll(make_scorer(model, "fp32"), ids, scored, 32, stride, batch_size=3)
    assert count == n_tokens == mask.sum()
    if stride < 32:  # overlapping windows: every token but the very first is scored, exactly once
        assert count == len(ids) - 1
    assert math.exp(nll / count) == pytest.approx(reference, rel=1e-5)


def test_sliding_stream_leaves_padding_out():
    """pad mode: every block ends in padding, which must not become context for the next document."""
    pad = 50256
    padded = datasets.Dataset.from_dict({
        "input_ids": [[5, 6, 7, pad, pad], [8, 9, pad, pad, pad]],
        "labels": [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]],
        "attention_mask": [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]})
    ids, scored = token_stream(padded)
    assert ids.tolist() == [5, 6, 7, 8, 9] and scored.tolist() == [False, True, True, True, True]
    packed_ids, packed_scored = token_stream(blocks([[1, 2], [3, 4]]))
    assert packed_ids.tolist() == [1, 2, 3, 4] and packed_scored.all()


def test_pad_mode_sliding_window_is_the_document(pipeline_outputs):
    """One document per block: no window reaches into the previous document, so both figures agree."""
    tokenizer = load_tokenizer(pipeline_outputs / "data/input/gpt2-tokenizer")
    docs = [tokenizer("The river ran south.")["input_ids"], tokenizer("A game of chess, then tea.")["input_ids"]]
    width = max(map(len, docs)) + 3
    rows = [d + [50256] * (width - len(d)) for d in docs]
    padded = datasets.Dataset.from_dict({
        "input_ids": rows, "attention_mask": [[1] * len(d) + [0] * (width - len(d)) for d in docs],
        "labels": [d + [IGNORE_INDEX] * (width - len(d)) for d in docs]})
    result = evaluate_split({"finetuned": pipeline_outputs / "models/finetuned"}, padded, tokenizer, 2, 2, "fp32",
                            False)["finetuned"]
    model = load_model(pipeline_outputs / "models/finetuned")
    nll, count = reference_nll(model, docs, docs)
    assert result["sliding_perplexity"] == result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sliding_windows_cover_each_token_once():
    windows = sliding_windows(100, 32, 12)
    assert windows[0] == (0, 32, 32) and windows[1] == (12, 44, 12) and windows[-1][1] == 100
    assert sum(n for _, _, n in windows) == 100
    assert all(e - b - n >= 32 - 12 for b, e, n in windows[1:])  # at least window - stride tokens of context


def test_bytes_per_token_are_exact_for_gpt2(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    sizes = token_bytes(tokenizer)
    text = "Héllo wörld — 漢字 and emoji 🙂!\nNew line."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert sizes[ids].sum() == len(text.encode("utf-8"))
    assert sizes[tokenizer.eos_token_id] == 0


def test_summary_and_comparison_math():
    base, tuned = summarize(20.0, 10, 8), summarize(10.0, 10)
    bits = pytest.approx(20 / math.log(2) / 8)
    assert base == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2)), "bits_per_byte": bits}
    diff = compare(base, tuned)
    assert diff["perplexity_reduction"] == pytest.approx(math.exp(2) - math.exp(1))
    assert diff["perplexity_relative_reduction"] == pytest.approx(1 - math.exp(-1))
    assert diff["perplexity_ratio"] == pytest.approx(math.exp(-1))
    assert diff["loss_reduction"] == pytest.approx(1.0)


def test_base_and_finetuned_on_the_same_tokens_every_split(pipeline_outputs, tmp_path):
    out = pipeline_outputs
    processed = datasets.load_from_disk(str(out / "data/processed"))
    # a test split, as WikiText has: the validation blocks again, reported separately
    with_test = datasets.DatasetDict({**processed, "test": processed["validation"]})
    with_test.save_to_disk(str(tmp_path / "processed"))
    write_manifest(tmp_path / "processed")  # as preprocess leaves it: the stages check what they read
    result = evaluate_models(out / "models/base", out / "models/finetuned", tmp_path / "processed", 4, False, "fp32",
                             16)
    val, test = result["validation"], result["test"]
    assert result["stride"] == 16 and result["block_size"] == 32
    assert val["tokens"] == len(processed["validation"]) * 31
    assert val["sliding_tokens"] == len(processed["validation"]) * 32 - 1
    base_nll, _ = token_nll(load_model(out / "models/base"), processed["validation"], 8)
    assert val["base"]["loss"] == pytest.approx(base_nll / val["tokens"], rel=1e-6)
    assert val["finetuned"]["loss"] == pytest.approx(test["finetuned"]["loss"], rel=1e-9)
    # an untrained GPT-2 is close to uniform over 50257 tokens; 8 steps of training already beat it
    assert val["base"]["perplexity"] > 20000 and val["finetuned"]["perplexity"] < val["base"]["perplexity"]
    # with more context per scored token, the sliding window scores the trained model better
    assert val["finetuned"]["sliding_loss"] < val["finetuned"]["loss"]
    assert 0 < val["finetuned"]["bits_per_byte"] < val["base"]["bits_per_byte"]
    assert [row["model"] for row in perplexity_rows(result)] == ["base (validation)", "finetuned (validation)",
                                                                 "base (test)", "finetuned (test)"]
    json.dumps(result)


def test_bf16_evaluation_is_close_to_fp32(pipeline_outputs):
    import torch as _torch

    if not _torch.cuda.is_available():
        from pipeline.core.device import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            pytest.skip("no native bf16 here")
    val = datasets.load_from_disk(str(pipeline_outputs / "data/processed"))["validation"]
    fp32 = token_nll(load_model(pipeline_outputs / "models/finetuned"), val, 8, "fp32")
    bf16 = token_nll(load_model(pipeline_outputs / "models/finetuned"), val, 8, "bf16")
    assert bf16[1] == fp32[1] and bf16[0] == pytest.approx(fp32[0], rel=2e-3)
    assert np.isfinite(bf16[0])
