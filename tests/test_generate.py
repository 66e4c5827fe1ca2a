"""pipeline/generate.py: seeded batched sampling, base vs fine-tuned side by side, the copying and
repetition checks, prompts files, ad hoc use."""

from __future__ import annotations

import json
from dataclasses import replace

import datasets
import numpy as np
import pytest

from pipeline.core.common import PipelineError
from pipeline.core.loading import load_model, load_tokenizer
from pipeline.generate import copied_fraction, distinct, training_ngrams
from pipeline.generation.prompts import load_prompts
from pipeline.generation.sampling import cut_at_stop, sample
from tests.conftest import run_stage
from tests.support import project_section


@pytest.fixture(scope="module")
def model_and_tokenizer(pipeline_outputs):
    path = pipeline_outputs / "models/finetuned"
    return load_model(path), load_tokenizer(path)


CFG = project_section("generate", prompts=["The river", "A game of chess is", "Bread"], max_new_tokens=12,
                     num_return_sequences=2, seed=5, batch_size=2)


def texts(records):
    return [(r["prompt"], r["sample"], r["text"]) for r in records]


def test_same_seed_same_samples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first, tokens_per_second = sample(model, tokenizer, CFG.prompts, CFG)
    assert texts(first) == texts(sample(model, tokenizer, CFG.prompts, CFG)[0])
    assert [(r["prompt"], r["sample"]) for r in first] == [(p, j) for p in CFG.prompts for j in (0, 1)]
    assert all(r["ids"] and r["text"] for r in first) and tokens_per_second > 0
    assert texts(first) != texts(sample(model, tokenizer, CFG.prompts, replace(CFG, seed=6))[0])


def test_left_padding_does_not_change_a_prompts_greedy_continuation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    greedy = replace(CFG, do_sample=False, num_return_sequences=1)
    batched = sample(model, tokenizer, ["The river", "A game of chess is played on"], greedy)[0]
    alone = sample(model, tokenizer, ["The river"], greedy)[0]
    assert batched[0]["ids"] == alone[0]["ids"]


def test_empty_prompt_and_stop_strings(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    records, _ = sample(model, tokenizer, ["", "The river"], replace(CFG, do_sample=False, num_return_sequences=1))
    assert [r["prompt"] for r in records] == ["", "The river"] and len(records[1]["ids"]) <= 12
    assert cut_at_stop("one. two\n\nthree", ["\n\n", "two"]) == "one. "
    assert cut_at_stop("no stop here", ["\n\n"]) == "no stop here"


def test_copying_check_on_constructed_samples(pipeline_outputs, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    train = datasets.load_from_disk(str(pipeline_outputs / "data/processed"))["train"]
    train_ngrams = training_ngrams(train)
    blocks = np.asarray(train["input_ids"])
    copied = blocks.reshape(-1)[100:140].tolist()  # 40 tokens straight from the training text
    assert copied_fraction(copied[:5], copied[5:], train_ngrams) == 1.0
    fresh = tokenizer(" Quantum marmalade orbits seventeen purple violins beneath Tuesday's humming glacier"
                      " while accountants juggle foggy pineapples", add_special_tokens=False).input_ids
    assert copied_fraction(fresh[:3], fresh[3:], train_ngrams) < 0.05
    assert copied_fraction([], [1, 2, 3], train_ngrams) is None  # shorter than one 8-gram


def test_distinct_ngrams():
    assert distinct([1, 2, 3, 4], 1) == 1.0 and distinct([1, 2, 3, 4], 2) == 1.0
    assert distinct([7, 7, 7, 7], 1) == 0.25 and distinct([7, 7, 7, 7], 2) == pytest.approx(1 / 3)
    assert distinct([5], 2) is None


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "from json"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    assert load_prompts(project_section("generate", prompts=["a"], prompts_file=str(tmp_path / "p.txt"))) == [
        "a", "first prompt", "second prompt"]
    only_file = project_section("generate", prompts=[], prompts_file=str(tmp_path / "p.jsonl"))
    assert load_prompts(only_file) == ["from json"]
    with pytest.raises(PipelineError, match='line 1 of .*bad.jsonl is not a JSON object with a "prompt" string'):
        load_prompts(project_section("generate", prompts_file=str(tmp_path / "bad.jsonl")))
    (tmp_path / "number.jsonl").write_text('{"prompt": 7}\n')
    with pytest.raises(PipelineError, match='line 1 of .*number.jsonl is not a JSON object with a "prompt" string'):
        load_prompts(project_section("generate", prompts_file=str(tmp_path / "number.jsonl")))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"prompts_file: .*latin1.txt is not UTF-8 \(byte 0xe9 at offset 3\)"):
        load_prompts(project_section("generate", prompts_file=str(tmp_path / "latin1.txt")))
    with pytest.raises(PipelineError, match="prompts_file: .*missing.txt does not exist"):
        load_prompts(project_section("generate", prompts_file=str(tmp_path / "missing.txt")))
    with pytest.raises(PipelineError, match="no prompts"):
        load_prompts(project_section("generate", prompts=[]))


def test_stage_writes_side_by_side_samples_and_metrics(pipeline_outputs, tmp_path):
    out = pipeline_outputs
    result = run_stage("generate", "--params", str(out / "params.yaml"), "--model", str(out / "models/finetuned"),
                       "--base", str(out / "models/base"), "--data", str(out / "data/processed"),
                       "--out", str(tmp_path / "outputs"), "--metrics", str(tmp_path / "generate.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "outputs/samples.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"finetuned", "base"} and len(records) == 2 * 2 * 2
    first = records[0]
    assert first["params"]["max_new_tokens"] == 8 and "prompts" not in first["params"]
    assert {"copied_8gram_fraction", "distinct_1", "distinct_2", "new_tokens"} <= set(first)
    markdown = (tmp_path / "outputs/samples.md").read_text()
    assert "| # | finetuned | base |" in markdown and "## 'The river'" in markdown
    metrics = json.loads((tmp_path / "generate.json").read_text())
    assert metrics["finetuned"]["samples"] == 4 and metrics["base"]["tokens_per_second"] > 0


def test_ad_hoc_prints_and_writes_nothing(pipeline_outputs, tmp_path):
    result = run_stage("generate", "--model", str(pipeline_outputs / "models/finetuned"), "--prompt", "The river",
                       "--max-new-tokens", "16", cwd=tmp_path)  # the project's 64 would fill the tiny model's 64
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("--- 'The river'") == 2 and "tokens/s" in result.stderr
    assert not list(tmp_path.iterdir())


def ad_hoc(outputs, *args, stdin: str | None = None, cwd=None):
    """Ad hoc sampling through the CLI, in process (test_ad_hoc_prints_and_writes_nothing runs it as a user does)."""
    from pipeline.generate import main
    from tests.conftest import in_process

    return in_process(main, ["--model", str(outputs / "models/finetuned"), *args], cwd or outputs, stdin)


def test_ad_hoc_flags_set_every_sampling_setting(pipeline_outputs):
    greedy = [ad_hoc(pipeline_outputs, "--prompt", "The river", "--greedy", "--max-new-tokens", "5") for _ in "ab"]
    assert greedy[0].returncode == 0, greedy[0].stderr[-2000:]
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.count("--- ") == 1  # one greedy answer
    sampled = [ad_hoc(pipeline_outputs, "--prompt", "The river", "--num-samples", "3", "--temperature", "1.5",
                      "--top-k", "0", "--top-p", "0.9", "--seed", str(seed), "--max-new-tokens", "6")
               for seed in (1, 2)]
    assert sampled[0].stdout.count("--- 'The river' #") == 3 and sampled[0].stdout != sampled[1].stdout
    stopped = ad_hoc(pipeline_outputs, "--prompt", "The river", "--greedy", "--max-new-tokens", "8", "--stop", " ")
    continuation = "\n".join(stopped.stdout.splitlines()[1:])[len("The river"):]
    assert " " not in continuation and stopped.returncode == 0, stopped.stdout  # cut at the first space


def test_ad_hoc_prompts_from_a_file_and_from_stdin(pipeline_outputs, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "A game"}\n{"prompt": "The sea"}\n')
    from_file = ad_hoc(pipeline_outputs, "--prompts-file", str(tmp_path / "p.jsonl"), "--greedy")
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    assert "--- 'A game' #1" in from_file.stdout and "--- 'The sea' #1" in from_file.stdout
    piped = ad_hoc(pipeline_outputs, "--prompt", "-", "--greedy", "--max-new-tokens", "4", stdin="The river\nA game\n")
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "--- 'The river' #1" in piped.stdout and "--- 'A game' #1" in piped.stdout


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0.5"], "--temperature is for ad hoc sampling (with --prompt or --prompts-file)"),
    (["--num-samples", "3"], "--num-samples is for ad hoc sampling"),
    (["--prompt", "x", "--temperature", "-1"], "generate.temperature must be >= 0.0001"),
    (["--prompt", "x", "--top-p", "2"], "generate.top_p must be <= 1.0"),
    (["--prompts-file", "missing.txt"], "--prompts-file: missing.txt does not exist"),
])
def test_bad_ad_hoc_flags_are_one_line(pipeline_outputs, tmp_path, args, message):
    failed = ad_hoc(pipeline_outputs, *args, cwd=tmp_path)
    assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
