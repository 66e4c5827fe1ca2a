"""pipeline/generate.py: seeded batched sampling, base vs fine-tuned side by side, the copying and
repetition checks, prompts files, ad hoc use."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import datasets
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.loading import load_model, load_tokenizer
from pipeline.generation.prompts import load_prompts
from pipeline.generation.sampling import cut_at_stop, sample
from pipeline.tasks.causal_lm.generate import copied_fraction, distinct, training_ngrams
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


# --- sampling at scale: the distribution transformers samples, drawn from top_k candidates alone -----------------

def warped_by_transformers(scores, temperature, top_k, top_p):
    """The next-token distribution transformers' sampling draws from: its warpers, then a softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, scores)
    scores = TopKLogitsWarper(top_k)(None, scores) if top_k else scores
    scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 50, 0.95), (1.5, 7, 1.0), (1.0, 200, 0.5),
                                                      (0.7, 0, 0.9), (1.0, 0, 1.0)])
def test_the_top_k_sampler_keeps_transformers_distribution(temperature, top_k, top_p):
    import torch

    from pipeline.generation.sampling import SampleTopK

    torch.manual_seed(0)
    scores = torch.randn(6, 1000) * 3
    sampler = SampleTopK(temperature, top_k, top_p)
    expected = warped_by_transformers(scores.clone(), temperature, top_k, top_p)
    probs, ids = sampler.candidates(None, scores.clone())
    got = torch.zeros_like(expected).scatter_(-1, ids, probs) if ids is not None else probs
    assert torch.equal(got > 0, expected > 0)  # the same support: the same tokens can be drawn
    assert torch.allclose(got, expected, atol=1e-6)
    draws = torch.stack([sampler(None, scores.clone()).argmax(-1) for _ in range(4000)])  # (draws, rows)
    assert bool((expected.gather(-1, draws.T) > 0).all())  # nothing outside the support is ever drawn
    frequency = torch.zeros_like(expected).scatter_add_(-1, draws.T, torch.ones(draws.T.shape)) / len(draws)
    assert (frequency - expected).abs().max() < 0.03  # and draws follow it (4,000 draws: sd <= 0.008)


def test_without_top_k_the_samples_are_transformers_own(model_and_tokenizer):
    """top_k 0: the whole vocabulary is drawn from as transformers does, so a seed gives its very samples."""
    import torch

    model, tokenizer = model_and_tokenizer
    cfg = replace(CFG, top_k=0, top_p=0.9, temperature=1.3, num_return_sequences=3, batch_size=3)
    ours = sample(model, tokenizer, ["The river"], cfg)[0]
    torch.manual_seed(cfg.seed)
    inputs = tokenizer(["The river"] * 3, return_tensors="pt", add_special_tokens=False)
    theirs = model.generate(**inputs, do_sample=True, top_k=0, top_p=0.9, temperature=1.3,
                            max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    width = inputs["input_ids"].shape[1]
    assert [r["ids"] for r in ours] == [[t for t in row[width:].tolist() if t != tokenizer.pad_token_id]
                                        for row in theirs]


def test_samples_go_through_the_model_batch_size_at_a_time(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    rows = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: rows.append(kw["input_ids"].shape[0]) or original(**kw))
    records, _ = sample(model, tokenizer, ["The river", "Bread"], replace(CFG, num_return_sequences=5, batch_size=4))
    assert rows == [4, 4, 2] and [(r["prompt"], r["sample"]) for r in records] == [
        (p, j) for p in ("The river", "Bread") for j in range(5)]


def test_a_long_generation_prints_progress(pipeline_outputs, monkeypatch, caplog):
    from pipeline.generation.sampling import Progress

    monkeypatch.setattr(Progress, "FIRST_S", 0.0)  # a line every step, as a long run has one every 30 s
    monkeypatch.setattr(Progress, "EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="pipeline.generation.sampling"):
        result = ad_hoc(pipeline_outputs, "--prompt", "The river", "--num-samples", "6", "--max-new-tokens", "5",
                        "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in caplog.messages if "tokens/s, ETA" in line]
    assert len(lines) >= 5 and "generate: 0/6 samples" in lines[0], caplog.messages
    assert any("generate: 4/6 samples" in line for line in lines)  # the first batch of 4 done
    assert re.search(r"\d/6 samples, [\d,]+ tokens/s, ETA \d+m\d\ds", lines[-1])


def test_stop_strings_end_a_sample_at_the_step_they_appear(tokenizer):
    import torch

    from pipeline.generation.sampling import StopStrings

    prompt = tokenizer("Stop here. Then", add_special_tokens=False).input_ids
    new = tokenizer(" more text. Stop", add_special_tokens=False).input_ids
    criterion = StopStrings(tokenizer, ["Stop", "\n\n"], prompt_width=len(prompt))
    done = [bool(criterion(torch.tensor([prompt + new[:n]]))[0]) for n in range(1, len(new) + 1)]
    assert done == [False] * (len(new) - 1) + [True]  # not for the prompt's "Stop": only at the new one


def test_the_stop_list_is_bounded_in_one_line(pipeline_outputs, tmp_path):
    stops = [a for i in range(65) for a in ("--stop", f"s{i}")]
    many = ad_hoc(pipeline_outputs, "--prompt", "x", "--max-new-tokens", "8", *stops, cwd=tmp_path)
    assert many.returncode == 2 and many.stderr.count("\n") == 1 and "generate.stop" in many.stderr, many.stderr
    long = ad_hoc(pipeline_outputs, "--prompt", "x", "--max-new-tokens", "8", "--stop", "y" * 201, cwd=tmp_path)
    assert long.returncode == 2 and long.stderr.count("\n") == 1 and "generate.stop" in long.stderr, long.stderr


def test_precision_sets_the_weights_dtype(pipeline_outputs, model_and_tokenizer, monkeypatch):
    import torch

    from pipeline.core import device
    from pipeline.generation.sampling import sampling_dtype

    assert sampling_dtype(replace(CFG, precision="fp32")) is None
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert sampling_dtype(replace(CFG, precision="auto")) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert sampling_dtype(replace(CFG, precision="auto")) is None
    with pytest.raises(PipelineError, match="generate.precision=bf16 but this CPU has no native bf16"):
        sampling_dtype(replace(CFG, precision="bf16"))
    tokenizer = model_and_tokenizer[1]
    bf16 = load_model(pipeline_outputs / "models/finetuned", dtype=torch.bfloat16)
    records, _ = sample(bf16, tokenizer, ["The river"], replace(CFG, max_new_tokens=3, num_return_sequences=1))
    assert next(bf16.parameters()).dtype == torch.bfloat16 and len(records[0]["ids"]) == 3
