"""pipeline/generate.py: seeded, per-prompt reproducible sampling and its two output files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline.common import load_model, load_tokenizer
from pipeline.config import GenerateConfig
from pipeline.generate import sample
from tests.conftest import run_stage


@pytest.fixture(scope="module")
def model_and_tokenizer(pipeline_outputs):
    path = pipeline_outputs / "models/finetuned"
    return load_model(path), load_tokenizer(path)


CFG = GenerateConfig(prompts=["The river", "A game of chess"], max_new_tokens=12, num_return_sequences=2, seed=5)


def test_same_seed_same_samples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = sample(model, tokenizer, CFG.prompts, CFG)
    assert first == sample(model, tokenizer, CFG.prompts, CFG)
    assert len(first) == 4 and all(r["text"] for r in first)
    assert first != sample(model, tokenizer, CFG.prompts, replace(CFG, seed=6))


def test_a_prompts_samples_do_not_depend_on_the_other_prompts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    both = sample(model, tokenizer, CFG.prompts, CFG)
    alone = sample(model, tokenizer, CFG.prompts[:1], CFG)
    assert alone == both[:2]


def test_greedy_and_empty_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = replace(CFG, do_sample=False, num_return_sequences=1)
    records = sample(model, tokenizer, ["", "The river"], cfg)
    assert [r["prompt"] for r in records] == ["", "The river"]
    assert len(tokenizer(records[1]["text"]).input_ids) <= 12


def test_cli_writes_jsonl_and_markdown(pipeline_outputs, tmp_path):
    result = run_stage("generate", "--params", str(pipeline_outputs / "params.yaml"), "--model",
                       str(pipeline_outputs / "models/finetuned"), "--out", str(tmp_path / "outputs"))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "outputs/samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [("The river", 0), ("The river", 1),
                                                           ("A game of chess", 0), ("A game of chess", 1)]
    assert records[0]["params"]["max_new_tokens"] == 8 and "prompts" not in records[0]["params"]
    markdown = (tmp_path / "outputs/samples.md").read_text()
    assert "## 'The river'" in markdown and records[0]["text"].split("\n")[0] in markdown
