"""pipeline/evaluate.py: token-weighted loss, base vs fine-tuned on the same blocks."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from pipeline.common import IGNORE_INDEX, load_model
from pipeline.evaluate import compare, evaluate, summarize, token_nll


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
    model = load_model(pipeline_outputs / "models/finetuned")
    rows = [[464, 7850, 318, 257, 1295, 13], [32, 983, 286, 19780, 50256, 50256]]
    labels = [rows[0], [32, 983, 286, 19780, IGNORE_INDEX, IGNORE_INDEX]]
    nll, count = token_nll(model, blocks(rows, labels), batch_size=2)
    ref_nll, ref_count = reference_nll(model, rows, labels)
    assert count == ref_count == 5 + 3
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_loss_does_not_depend_on_batch_size(pipeline_outputs):
    model = load_model(pipeline_outputs / "models/finetuned")
    val = datasets.load_from_disk(str(pipeline_outputs / "data/processed"))["validation"]
    one, n1 = token_nll(model, val, batch_size=1)
    many, n2 = token_nll(model, val, batch_size=5)
    assert n1 == n2 == len(val) * 31
    assert one == pytest.approx(many, rel=1e-5)


def test_summary_and_comparison_math():
    base, tuned = summarize(20.0, 10), summarize(10.0, 10)
    assert base == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2))}
    diff = compare(base, tuned)
    assert diff["perplexity_reduction"] == pytest.approx(math.exp(2) - math.exp(1))
    assert diff["perplexity_ratio"] == pytest.approx(math.exp(-1))
    assert diff["loss_reduction"] == pytest.approx(1.0)


def test_base_and_finetuned_on_the_same_blocks(pipeline_outputs, caplog):
    out = pipeline_outputs
    result = evaluate(out / "models/base", out / "models/finetuned", out / "data/processed", 4, False)
    val = datasets.load_from_disk(str(out / "data/processed"))["validation"]
    assert result["tokens"] == len(val) * 31
    base_nll, _ = token_nll(load_model(out / "models/base"), val, 8)
    assert result["base"]["loss"] == pytest.approx(base_nll / result["tokens"], rel=1e-6)
    # an untrained GPT-2 is close to uniform over 50257 tokens; 8 steps of training already beat it
    assert result["base"]["perplexity"] > 20000
    assert result["finetuned"]["perplexity"] < result["base"]["perplexity"]
    json.dumps(result)  # the metrics file must serialise
