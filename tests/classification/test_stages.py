"""task: classification through every stage, on a tiny GPT-2 and real labelled text (standard library
docstrings of three module families): the classifier's figures beside its baselines, the confusion
plot, predictions that transformers.pipeline("text-classification") reproduces, the headline row, the
model card; determinism, class weights, LoRA and freezing; an interrupted run resumed; broken label
files and a language model where a classifier belongs; the ad hoc --text command; the params it refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.params import from_dict, load_params, merge
from tests.conftest import ROOT, TINY, in_process, write_params

FAMILIES = ("numbers", "files", "network")
PROMPTS = ["Return the square root of x.", "Remove the file at the given path.", "Connect to host and port."]
CLASSIFY = {
    "task": "classification",
    "data": {"dataset": "data/input/docstrings.jsonl", "config": None},
    "preprocess": {"mode": "pad", "block_size": 32, "add_eos": False, "val_fraction": 0.25},
    "train": {"max_steps": 12, "eval_steps": 6, "save_steps": 6, "per_device_train_batch_size": 8},
    "generate": {"prompts": PROMPTS, "compare_base": True},
}


@pytest.fixture(scope="session")
def docstrings(tmp_path_factory) -> Path:
    """30 docstrings of each of three families, as JSONL."""
    from pipeline.tools.corpora import write_stdlib_docstrings

    every = tmp_path_factory.mktemp("stdlib") / "all.jsonl"
    write_stdlib_docstrings(every)
    rows = [json.loads(line) for line in every.read_text().splitlines()]
    kept = [r for family in FAMILIES for r in [r for r in rows if r["label"] == family][:30]]
    out = every.parent / "docstrings.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def run_all(root: Path, stages=("download", "preprocess", "train", "evaluate", "generate", "report")) -> None:
    from importlib import import_module

    for stage in stages:
        result = in_process(import_module(f"pipeline.{stage}").main, [], root)
        assert result.returncode == 0, (stage, result.stderr[-3000:])


@pytest.fixture(scope="session")
def classified(tmp_path_factory, tokenizer_dir, docstrings) -> Path:
    """A directory where all six stages ran with task: classification (in process)."""
    root = tmp_path_factory.mktemp("classified")
    shutil.copytree(tokenizer_dir, root / "data/input/gpt2-tokenizer")
    shutil.copy(docstrings, root / "data/input/docstrings.jsonl")
    write_params(root, CLASSIFY)
    run_all(root)
    return root


def read(root: Path, path: str):
    text = (root / path).read_text()
    return [json.loads(line) for line in text.splitlines()] if path.endswith(".jsonl") else json.loads(text)


def test_every_stage_reports_the_classifier_beside_its_baselines(classified):
    data, train, evaluation = read(classified, "metrics/data.json"), read(classified, "metrics/train.json"), \
        read(classified, "metrics/eval.json")
    assert data["task"] == "classification" and data["labels"] == sorted(FAMILIES)
    assert data["train"]["examples"] + data["validation"]["examples"] == 90
    assert 0 <= train["eval_accuracy"] <= 1 and 0 <= train["eval_macro_f1"] <= 1
    validation = evaluation["validation"]
    assert set(validation) >= {"finetuned", "majority", "zero_shot", "macro_f1_gain_over_majority"}
    # the saved model is the one evaluated: the train stage's last evaluation is the evaluate stage's
    assert validation["finetuned"]["accuracy"] == pytest.approx(train["eval_accuracy"], abs=1e-9)
    assert validation["majority"]["accuracy"] == pytest.approx(1 / 3, abs=0.1)  # three balanced classes
    confusion = read(classified, "metrics/confusion.json")
    assert len(confusion) == validation["finetuned"]["examples"] == sum(map(sum, validation["finetuned"]
                                                                           ["confusion"]))
    curve = (classified / "dvclive/plots/metrics/eval/macro_f1.tsv").read_text().splitlines()  # 0: the new head
    assert curve[0] == "step\tmacro_f1" and [row.split("\t")[0] for row in curve[1:]] == ["0", "6", "12"]
    assert {row["actual"] for row in confusion} <= set(FAMILIES) and read(classified, "metrics/perplexity.json") == []
    summary = read(classified, "metrics/summary.json")
    assert set(summary) == {"macro_f1", "accuracy", "f1_majority", "f1_zero_shot", "eval_loss", "tokens_s", "mfu",
                            "peak_gib", "train_min"}
    assert summary["macro_f1"] == round(validation["finetuned"]["macro_f1"], 4)
    card = (classified / "models/finetuned/README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "numbers" in card


def test_the_predictions_are_those_of_transformers_pipeline(classified):
    from transformers import pipeline

    records = read(classified, "outputs/predictions.jsonl")
    assert [r["text"] for r in records] == PROMPTS and all("base_zero_shot" in r for r in records)
    for r in records:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    # the saved tokenizer says how texts are read (block_size 32, right padding): no private config field
    saved = read(classified, "models/finetuned/tokenizer_config.json")
    assert saved["model_max_length"] == 32 and saved["padding_side"] == "right"
    assert "text_blocks" not in read(classified, "models/finetuned/config.json")
    classify = pipeline("text-classification", model=str(classified / "models/finetuned"), device="cpu")
    for r, theirs in zip(records, classify(PROMPTS, top_k=None, truncation=True), strict=True):
        assert {d["label"]: d["score"] for d in theirs} == pytest.approx(r["probabilities"], abs=1e-4)
    assert "| text | label |" in (classified / "outputs/predictions.md").read_text()


def test_ad_hoc_text_prints_labels_and_writes_nothing(classified):
    before = sorted(p.relative_to(classified) for p in classified.rglob("*"))
    from pipeline.generate import main

    result = in_process(main, ["--model", "models/finetuned", "--text", PROMPTS[0], "--text", "-"], classified,
                        stdin=PROMPTS[1] + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith(PROMPTS[0]) and lines[1].endswith(PROMPTS[1])
    assert lines[0].split("\t")[0] in FAMILIES
    assert sorted(p.relative_to(classified) for p in classified.rglob("*")) == before


def retrain(classified: Path, tmp_path: Path, **train_changes) -> tuple[dict, dict]:
    from pipeline.train import train

    params = load_params(classified / "params.yaml")
    params = replace(params, train=replace(params.train, **train_changes.pop("train", {})), **train_changes)
    metrics = train(params, classified / "data/processed", classified / "models/base", tmp_path / "model",
                    tmp_path / "checkpoints", tmp_path / "live", tmp_path / "train.json")
    from safetensors.torch import load_file

    return metrics, load_file(tmp_path / "model/model.safetensors")


def test_the_same_params_train_the_same_classifier(classified, tmp_path):
    import torch
    from safetensors.torch import load_file

    metrics, weights = retrain(classified, tmp_path)
    saved = load_file(classified / "models/finetuned/model.safetensors")
    assert all(torch.equal(weights[k], saved[k]) for k in saved)  # the new head is seeded too
    assert metrics["eval_loss"] == read(classified, "metrics/train.json")["eval_loss"]


def test_balanced_class_weights_and_lora_train_the_head_in_full(classified, tmp_path):
    import torch
    from safetensors.torch import load_file

    params = load_params(classified / "params.yaml")
    weighted = replace(params.classify, class_weights="balanced")
    lora = replace(params.train.lora, enabled=True, r=4, target_modules=["c_attn"])
    metrics, weights = retrain(classified, tmp_path, classify=weighted, train={"lora": lora})
    base = load_file(classified / "models/base/model.safetensors")
    assert metrics["trainable_parameters"] < metrics["parameters"] / 10
    assert not torch.equal(weights["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(weights["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])
    assert "score.weight" in weights and (tmp_path / "model/adapter").is_dir()
    assert metrics["train_loss"] != read(classified, "metrics/train.json")["train_loss"]


@pytest.mark.parametrize("override, says", [
    ({"preprocess": {"mode": "pack"}}, "preprocess.mode must be pad with task: classification"),
    ({"data": {"prompt_template": "Q: {q}", "response_template": "A: {a}"}}, "data.prompt_template is prompt/"),
    ({"train": {"samples": {"every": 5}}}, "train.samples.every samples text during training"),
    ({"classify": {"zero_shot_prompt": "Topic of {body}:"}}, "must use the one field {text}"),
    ({"classify": {"labels": ["a", "b", "a"]}}, "classify.labels lists 'a' twice"),
])
def test_settings_for_the_other_task_are_refused_in_one_line(override, says):
    params = merge(merge(yaml_params(), merge(TINY, CLASSIFY)), override)
    with pytest.raises(PipelineError, match=re_escape(says)):
        from_dict(params)


def yaml_params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_freezing_keeps_the_frozen_parts_and_trains_the_head(classified, tmp_path):
    import torch
    from safetensors.torch import load_file

    params = load_params(classified / "params.yaml")
    frozen = replace(params.train.freeze, embeddings=True, layers=1)
    metrics, weights = retrain(classified, tmp_path, train={"freeze": frozen})
    base = load_file(classified / "models/base/model.safetensors")
    rows = base["transformer.wte.weight"].shape[0]  # the classifier's pad token adds a row past them
    assert torch.equal(weights["transformer.wte.weight"][:rows], base["transformer.wte.weight"])
    assert torch.equal(weights["transformer.wpe.weight"], base["transformer.wpe.weight"])
    assert torch.equal(weights["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(weights["transformer.h.1.mlp.c_fc.weight"], base["transformer.h.1.mlp.c_fc.weight"])
    assert "score.weight" in weights and metrics["trainable_parameters"] < metrics["parameters"]


def test_an_interrupted_classifier_resumes_to_the_same_model(classified, tmp_path):
    """As if killed after the step-6 checkpoint: the next run resumes from it (the best-model choice
    included) and saves the weights the uninterrupted run saved. With a real SIGKILL: tests/scale."""
    import torch
    from safetensors.torch import load_file

    from pipeline.train import train
    from pipeline.training.checkpoints import FINISHED

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(classified / "checkpoints", ckpt)
    folder = next(ckpt.iterdir())
    shutil.rmtree(folder / "checkpoint-12")
    (folder / FINISHED).unlink()
    params = load_params(classified / "params.yaml")
    resumed = train(params, classified / "data/processed", classified / "models/base", tmp_path / "model", ckpt,
                    tmp_path / "live", tmp_path / "train.json")
    straight = read(classified, "metrics/train.json")
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == straight["steps"] == 12
    assert resumed["eval_macro_f1"] == straight["eval_macro_f1"]
    a, b = load_file(tmp_path / "model/model.safetensors"), load_file(classified / "models/finetuned/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


@pytest.fixture
def broken(classified, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(classified, root, symlinks=True)
    return root


def edit_json(path: Path, change) -> None:
    """Change a JSON file a stage wrote, and its size in the folder's manifest: a file as an older or
    other version of the stage might write it, not a damaged one (the manifest catches those)."""
    from pipeline.core.outputs import write_manifest

    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    write_manifest(path.parent)


@pytest.mark.parametrize("labels", [None, ["numbers"], ["a", "a", "b"], [1, 2, 3], "numbers"])
def test_label_names_missing_from_the_processed_data_are_one_line(broken, labels):
    from tests.test_bad_input import run_clean_failure

    edit_json(broken / "data/processed/provenance.json", lambda d: d.update(labels=labels))
    for stage in ("train", "evaluate"):
        line = run_clean_failure(broken, stage)
        assert "provenance.json holds no list of label names" in line and "re-run the preprocess stage" in line


def test_a_classifier_trained_on_other_labels_is_one_line(broken):
    from tests.test_bad_input import run_clean_failure

    edit_json(broken / "data/processed/provenance.json", lambda d: d.update(labels=d["labels"][::-1]))
    line = run_clean_failure(broken, "evaluate")
    assert "was trained on the labels" in line and "re-run the train stage" in line


def test_a_language_model_where_a_classifier_belongs_is_one_line(classified):
    from pipeline.generate import main

    result = in_process(main, ["--model", "models/base", "--text", PROMPTS[0]], classified)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "models/base is not a classifier (it has no score.weight)" in errors[0], errors


@pytest.mark.scale  # a real SIGKILL of a process: make test-scale (CI)
def test_a_killed_classifier_resumes_to_the_same_model(classified, tmp_path):
    """SIGKILL once the step-6 checkpoint is complete; the next run resumes from it (best-model choice
    included) and saves the weights the uninterrupted run saved."""
    import torch
    from safetensors.torch import load_file

    from pipeline.training.checkpoints import COMPLETE

    root = tmp_path / "run"
    shutil.copytree(classified, root, ignore=shutil.ignore_patterns("checkpoints", "finetuned", "dvclive"))
    (root / "metrics/train.json").unlink()
    command, env = [sys.executable, "-m", "pipeline.train"], {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(root.glob(f"checkpoints/*/checkpoint-6/{COMPLETE}")) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) != 0, "the run finished before it could be killed"
    assert not (root / "models/finetuned").exists() and not (root / "metrics/train.json").exists()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, straight = read(root, "metrics/train.json"), read(classified, "metrics/train.json")
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == straight["steps"] == 12
    assert resumed["eval_macro_f1"] == straight["eval_macro_f1"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-6)
    a, b = (load_file(r / "models/finetuned/model.safetensors") for r in (root, classified))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
