"""Train-stage options: LoRA, freezing, vocabulary padding, the NaN guard, kill-and-resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import PipelineError
from pipeline.core.params import load_params
from pipeline.train import train
from pipeline.training.checkpoints import COMPLETE, FINISHED
from tests.conftest import ROOT, write_params
from tests.support import project_section


def run(outputs: Path, tmp_path: Path, **train_changes) -> dict:
    params = load_params(outputs / "params.yaml")
    params = replace(params, train=replace(params.train, **train_changes))
    return train(params, outputs / "data/processed", outputs / "models/base", tmp_path / "model",
                 tmp_path / "checkpoints", tmp_path / "dvclive", tmp_path / "train.json")


def test_nan_loss_stops_training_naming_the_step_and_changes_no_output(pipeline_outputs, tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"  # the base model with a NaN in its final layer norm: the first loss is nan
    shutil.copytree(pipeline_outputs / "models/base", base)
    weights = load_file(base / "model.safetensors")
    weights["transformer.ln_f.weight"][0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    earlier = {name: tmp_path / name for name in ("model", "dvclive", "train.json")}
    for path in earlier.values():  # the outputs of an earlier run, which a failed run must leave alone
        path.mkdir() if path.suffix == "" else path.write_text("{}")
        if path.is_dir():
            (path / "earlier").write_text("kept")
    params = load_params(pipeline_outputs / "params.yaml")
    with pytest.raises(PipelineError, match=r"the training loss became nan by step \d+; lower lr"):
        train(params, pipeline_outputs / "data/processed", base, earlier["model"], tmp_path / "checkpoints",
              earlier["dvclive"], earlier["train.json"])
    assert sorted(p.name for p in earlier["model"].iterdir()) == sorted(p.name for p in earlier["dvclive"].iterdir())
    assert [p.name for p in earlier["model"].iterdir()] == ["earlier"]
    assert earlier["train.json"].read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "checkpoints", "dvclive", "model", "train.json"]


def test_a_nan_after_the_last_logged_step_or_in_the_weights_is_caught(pipeline_outputs):
    """The run's own train_loss covers the steps after the last logging interval; the weights are checked
    before they are saved, whatever the losses said."""
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

    from pipeline.training.callbacks import finite_weights, stop_on_non_finite

    with pytest.raises(PipelineError, match="the training loss became nan by step 8"):
        stop_on_non_finite().on_log(None, TrainerState(global_step=8), TrainerControl(),
                                    logs={"train_loss": float("nan")})
    model = AutoModelForCausalLM.from_pretrained(pipeline_outputs / "models/finetuned")
    finite_weights(model.named_parameters())  # the trained tiny model is finite
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(PipelineError, match=r"training left non-finite weights \(transformer.h.1.mlp.c_fc.weight\)"):
        finite_weights(model.named_parameters())


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "8589934592 bytes"), torch.OutOfMemoryError("CUDA out of memory")])
def test_running_out_of_memory_with_the_preflight_off_is_one_line(pipeline_outputs, tmp_path, monkeypatch, error):
    from dataclasses import replace

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("transformers.Trainer.train", out_of_memory)
    params = load_params(pipeline_outputs / "params.yaml")
    params = replace(params, train=replace(params.train, memory_preflight=False))
    with pytest.raises(PipelineError, match=r"training ran out of memory on cpu .*lower "
                                            r"train.per_device_train_batch_size \(now 4\)"):
        train(params, pipeline_outputs / "data/processed", pipeline_outputs / "models/base", tmp_path / "model",
              tmp_path / "checkpoints", tmp_path / "dvclive", tmp_path / "train.json")
    assert not (tmp_path / "model").exists()


def test_lora_saves_a_plain_merged_model_and_the_adapter(pipeline_outputs, tmp_path):
    from transformers import AutoModelForCausalLM

    metrics = run(pipeline_outputs, tmp_path, lora=project_section("train.lora", enabled=True, r=4, alpha=8))
    assert 0 < metrics["trainable_parameters"] < 0.05 * metrics["parameters"]
    saved = load_file(tmp_path / "model/model.safetensors")
    base = load_file(pipeline_outputs / "models/base/model.safetensors")
    assert saved.keys() == base.keys()  # no lora_A/lora_B, no base_model.model. prefix
    assert not torch.equal(saved["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(saved["transformer.wte.weight"], base["transformer.wte.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # plain transformers, no peft
    assert type(model).__name__ == "GPT2LMHeadModel"
    adapter = load_file(tmp_path / "model/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the adapters alone, no embedding copy
    from peft import PeftModel  # the adapter on the unpadded base is the merged model
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pipeline_outputs / "models/base"),
                                      tmp_path / "model/adapter")
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_checkpoints_hold_the_adapters_alone_and_resume_to_the_same_model(pipeline_outputs, tmp_path):
    import shutil

    lora = project_section("train.lora", enabled=True, r=4, alpha=8)
    run(pipeline_outputs, tmp_path / "straight", lora=lora)
    checkpoints = sorted((tmp_path / "straight/checkpoints").glob("*/checkpoint-*"))
    assert len(checkpoints) == 2
    assert all(all("lora_" in k for k in load_file(c / "adapter_model.safetensors")) for c in checkpoints)
    shutil.copytree(tmp_path / "straight/checkpoints", tmp_path / "resumed/checkpoints")
    folder = tmp_path / "resumed/checkpoints" / checkpoints[1].parent.name
    shutil.rmtree(folder / checkpoints[1].name)  # as if killed before the second
    (folder / FINISHED).unlink()
    metrics = run(pipeline_outputs, tmp_path / "resumed", lora=lora)
    assert metrics["resumed_from_step"] == int(checkpoints[0].name.split("-")[1])
    straight, resumed = (load_file(tmp_path / f"{r}/model/model.safetensors") for r in ("straight", "resumed"))
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_freezing_keeps_embeddings_and_first_blocks_fixed(pipeline_outputs, tmp_path):
    metrics = run(pipeline_outputs, tmp_path, freeze=project_section("train.freeze", embeddings=True, layers=1))
    saved = load_file(tmp_path / "model/model.safetensors")
    base = load_file(pipeline_outputs / "models/base/model.safetensors")
    frozen = [k for k in base if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    assert all(torch.equal(saved[k], base[k]) for k in frozen)
    assert not torch.equal(saved["transformer.h.1.mlp.c_fc.weight"], base["transformer.h.1.mlp.c_fc.weight"])
    assert metrics["trainable_parameters"] == metrics["parameters"] - sum(base[k].numel() for k in frozen)


def test_freezing_more_layers_than_the_model_has(pipeline_outputs, tmp_path):
    with pytest.raises(PipelineError, match=r"train.freeze.layers \(5\) exceeds the model's 2 blocks"):
        run(pipeline_outputs, tmp_path, freeze=project_section("train.freeze", layers=5))


def test_padded_vocabulary_trains_the_same_and_saves_unpadded(pipeline_outputs, tmp_path):
    plain = run(pipeline_outputs, tmp_path / "plain")
    padded = run(pipeline_outputs, tmp_path / "padded", pad_vocab_multiple_of=64)
    assert padded["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-4)
    assert load_file(tmp_path / "padded/model/model.safetensors")["transformer.wte.weight"].shape[0] == 50257


def test_run_metrics_have_throughput_memory_and_parameters(pipeline_outputs, tmp_path):
    metrics = run(pipeline_outputs, tmp_path, attn_implementation="auto")
    assert metrics["tokens_per_second"] > 0 and 0 < metrics["mfu"] < 1
    # training throughput: the evaluations at steps 0, 4 and 8 are not training time
    assert 0 < metrics["eval_seconds"] < metrics["wall_seconds"]
    assert metrics["tokens_seen"] / metrics["tokens_per_second"] == pytest.approx(
        metrics["wall_seconds"] - metrics["eval_seconds"], rel=1e-9)
    # steady: the logged intervals after the 1 warm-up step without a checkpoint save (saves at 4 and 8 fall
    # in 4->6 and after 8): 1->2, 2->4 and 6->8
    assert metrics["warmup_steps"] == 1 and metrics["steady_steps"] == 5
    assert metrics["steady_tokens_per_second"] > 0 and 0 < metrics["steady_mfu"] < 1
    assert metrics["peak_memory_gib"] > 0.1 and metrics["peak_memory_kind"] == "peak RSS"
    assert 0 < metrics["memory_estimate_gib"] < metrics["peak_memory_gib"]  # RSS also counts Python and libraries
    assert metrics["trainable_parameters"] == metrics["parameters"] > 50257 * 32
    assert metrics["attention"] in ("sdpa", "eager") and set(metrics["attention_timings_ms"]) == {"sdpa", "eager"}
    rows = (tmp_path / "dvclive/plots/metrics/perf/tokens_per_second.tsv").read_text().splitlines()
    assert rows[0] == "step\ttokens_per_second" and len(rows) > 2


def train_command(root: Path, tag: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--params", "params-long.yaml", "--out", f"{tag}/model",
            "--checkpoints", f"{tag}/checkpoints", "--live-dir", f"{tag}/dvclive", "--metrics", f"{tag}/train.json"]


@pytest.fixture(scope="module")
def long_run(pipeline_outputs, tmp_path_factory):
    """A 60-step run of the tiny model, uninterrupted, as the reference; in a copy of the session's outputs
    (their data and base model), which other tests read unchanged."""
    import shutil

    root = tmp_path_factory.mktemp("long") / "run"
    shutil.copytree(pipeline_outputs, root, ignore=shutil.ignore_patterns("checkpoints", "finetuned", "dvclive"))
    write_params(root, {"train": {"max_steps": 60, "save_steps": 5, "eval_steps": 30, "logging_steps": 5}}).rename(
        root / "params-long.yaml")
    done = subprocess.run(train_command(root, "straight"), cwd=root, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.scale  # real signals to a real process: make test-scale (CI); in process: tests/test_train.py
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_result(long_run, sig):
    tag = f"killed-{sig.name}"
    first = subprocess.Popen(train_command(long_run, tag), cwd=long_run, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (not list((long_run / tag).glob(f"checkpoints/*/checkpoint-10/{COMPLETE}")) and first.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    first.send_signal(sig)
    assert first.wait(timeout=60) != 0, "the run finished before it could be killed"
    assert not (long_run / tag / "model").exists() and not (long_run / tag / "train.json").exists()

    again = subprocess.run(train_command(long_run, tag), cwd=long_run, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((long_run / tag / "train.json").read_text())
    straight = json.loads((long_run / "straight/train.json").read_text())
    assert 10 <= resumed["resumed_from_step"] < 60 and resumed["steps"] == straight["steps"] == 60
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-6)
    a = load_file(long_run / tag / "model/model.safetensors")
    b = load_file(long_run / "straight/model/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_samples_while_training_leave_the_training_unchanged(pipeline_outputs, tmp_path):
    from tests.support import project_section

    samples = project_section("train.samples", every=3, prompts=["", "The river"], max_new_tokens=5)
    run(pipeline_outputs, tmp_path / "sampled", samples=samples)
    text = (tmp_path / "sampled/dvclive/samples.md").read_text()
    assert text.count("## step ") == 2 and "## step 3" in text and "## step 6" in text
    assert "- 'The river' → '" in text and "- '' → '" in text
    sampled = load_file(tmp_path / "sampled/model/model.safetensors")
    straight = load_file(pipeline_outputs / "models/finetuned/model.safetensors")
    assert all(torch.equal(sampled[k], straight[k]) for k in straight)  # the RNG was put back


def test_a_tracker_that_is_not_installed_is_named(pipeline_outputs, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed here")
    with pytest.raises(PipelineError, match="train.report_to: tensorboard is not installed; pip install tensorboard"):
        run(pipeline_outputs, tmp_path, report_to=["tensorboard"])
    assert not (tmp_path / "model").exists()
