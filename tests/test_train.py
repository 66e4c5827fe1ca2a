"""pipeline/train.py: a real Trainer run on the tiny model, its metrics, resume safety, determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import datasets
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.params import load_params
from pipeline.train import train
from pipeline.training.checkpoints import (
    COMPLETE,
    FINISHED,
    fingerprint,
    mark_finished,
    resume_checkpoint,
    run_folder,
    start_fresh,
)


def test_training_writes_a_loadable_model_and_plots(pipeline_outputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pipeline_outputs
    model = AutoModelForCausalLM.from_pretrained(out / "models/finetuned")
    assert (out / "models/finetuned/model.safetensors").exists()
    assert not list((out / "models/finetuned").glob("*.bin"))
    assert AutoTokenizer.from_pretrained(out / "models/finetuned").eos_token_id == 50256
    assert model.config.n_layer == 2
    loss = (out / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    eval_loss = (out / "dvclive/plots/metrics/eval/loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) > 3
    # rows are logged at the Trainer's global step, so train and eval share the x axis
    assert [row.split("\t")[0] for row in eval_loss[1:]] == ["0", "4", "8"]  # 0: the base model
    assert (out / "dvclive/plots/metrics/eval/macro_f1.tsv").read_text() == "step\tmacro_f1\n"  # a classifier's


def test_training_reduces_the_loss(pipeline_outputs):
    rows = [float(r.split("\t")[1]) for r in
            (pipeline_outputs / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert rows[-1] < rows[0] - 0.5


def test_a_run_keeps_its_checkpoints_in_a_folder_named_by_its_fingerprint(pipeline_outputs):
    params = load_params(pipeline_outputs / "params.yaml")
    run_id = fingerprint(params, pipeline_outputs / "data/processed", pipeline_outputs / "models/base")
    folder = pipeline_outputs / "checkpoints" / run_id
    assert [p.name for p in (pipeline_outputs / "checkpoints").iterdir()] == [run_id]
    assert json.loads((folder / "fingerprint.json").read_text())["fingerprint"] == run_id
    assert (folder / "checkpoint-8").is_dir() and (folder / FINISHED).exists()
    # the live log is written in the run's folder and copied to dvclive/ with the other outputs
    live = "plots/metrics/train/loss.tsv"
    assert (folder / "dvclive" / live).read_text() == (pipeline_outputs / "dvclive" / live).read_text()


def test_fingerprint_changes_with_params_and_inputs(pipeline_outputs, tmp_path):
    import shutil

    params = load_params(pipeline_outputs / "params.yaml")
    data, base = pipeline_outputs / "data/processed", pipeline_outputs / "models/base"
    same = fingerprint(params, data, base)
    moved = tmp_path / "elsewhere"  # the same inputs at another path (another clone): the same run
    shutil.copytree(data, moved / "processed")
    shutil.copytree(base, moved / "base")
    assert fingerprint(params, moved / "processed", moved / "base") == same
    assert fingerprint(replace(params, lr=params.lr * 2), data, base) != same
    assert fingerprint(replace(params, train=replace(params.train, max_steps=9)), data, base) != same
    assert fingerprint(params, data, pipeline_outputs / "data/input") != same


def checkpoint(root, step: int, complete: bool) -> None:
    (root / f"checkpoint-{step}").mkdir(parents=True)
    (root / f"checkpoint-{step}/trainer_state.json").write_text("{}")
    (root / f"checkpoint-{step}/model.safetensors").write_bytes(b"weights")
    if complete:
        files = {"trainer_state.json": 2, "model.safetensors": 7}
        (root / f"checkpoint-{step}/{COMPLETE}").write_text(json.dumps({"step": step, "files": files}))


def test_a_run_never_resumes_or_removes_another_runs_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    a, b = run_folder(ckpt, "run-a"), run_folder(ckpt, "run-b")
    start_fresh(a, "run-a", "sdpa")
    checkpoint(a, 4, complete=True)
    assert resume_checkpoint(a, "run-a") == str(a / "checkpoint-4")
    assert resume_checkpoint(b, "run-b") is None
    start_fresh(b, "run-b", "sdpa")  # run b begins (and may fail): run a's checkpoint stays, resumable
    assert resume_checkpoint(a, "run-a") == str(a / "checkpoint-4")


def test_a_finished_run_is_trained_again_not_resumed(tmp_path, caplog):
    folder = run_folder(tmp_path, "run")
    start_fresh(folder, "run", "sdpa")
    checkpoint(folder, 8, complete=True)
    mark_finished(folder)
    with caplog.at_level("INFO"):
        assert resume_checkpoint(folder, "run") is None
    assert "finished before" in caplog.text


def test_partial_or_damaged_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    folder = run_folder(tmp_path, "run")
    start_fresh(folder, "run", "sdpa")
    checkpoint(folder, 4, complete=True)
    checkpoint(folder, 16, complete=False)  # killed while the Trainer was writing it
    checkpoint(folder, 12, complete=True)
    (folder / "checkpoint-12/model.safetensors").write_bytes(b"wei")  # cut short since
    checkpoint(folder, 8, complete=True)
    (folder / "checkpoint-8/trainer_state.json").write_text("{")  # not JSON
    (folder / "checkpoint-old").mkdir()  # a user's copy, named by hand: not the Trainer's
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(folder, "run") == str(folder / "checkpoint-4")
    assert "checkpoint-16: incomplete" in caplog.text
    assert "checkpoint-12/model.safetensors has 3 bytes, not the 7 written" in caplog.text
    assert "checkpoint-8: unreadable" in caplog.text


def test_a_damaged_fingerprint_starts_the_run_afresh(tmp_path, caplog):
    folder = run_folder(tmp_path, "run")
    start_fresh(folder, "run", "sdpa")
    checkpoint(folder, 4, complete=True)
    (folder / "fingerprint.json").write_bytes(b"\xff\xfe")
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(folder, "run") is None
    assert "fingerprint.json is unreadable" in caplog.text


def test_interrupted_run_resumes_to_the_same_model(pipeline_outputs, tmp_path):
    """Train 4 steps, stop, then train to 8 from the step-4 checkpoint: the same weights as 8 in one go."""
    import shutil

    import torch
    from safetensors.torch import load_file

    params = load_params(pipeline_outputs / "params.yaml")
    data, base = pipeline_outputs / "data/processed", pipeline_outputs / "models/base"
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(pipeline_outputs / "checkpoints", ckpt)
    folder = next(ckpt.iterdir())
    shutil.rmtree(folder / "checkpoint-8")  # as if killed between step 4 and step 8
    (folder / FINISHED).unlink()
    metrics = train(params, data, base, tmp_path / "model", ckpt, tmp_path / "dvclive", tmp_path / "train.json")
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 8
    straight_metrics = json.loads((pipeline_outputs / "metrics/train.json").read_text())
    assert metrics["train_loss"] == pytest.approx(straight_metrics["train_loss"], rel=1e-5)  # the whole run's
    resumed_rows, straight_rows = (
        [row.split("\t") for row in (d / "plots/metrics/train/loss.tsv").read_text().splitlines()]
        for d in (tmp_path / "dvclive", pipeline_outputs / "dvclive"))
    assert [r[0] for r in resumed_rows] == [r[0] for r in straight_rows]  # one row per step, none twice
    assert [float(r[1]) for r in resumed_rows[1:]] == pytest.approx([float(r[1]) for r in straight_rows[1:]], rel=1e-5)
    resumed = load_file(tmp_path / "model/model.safetensors")
    straight = load_file(pipeline_outputs / "models/finetuned/model.safetensors")
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_unsupported_precision_is_an_error_not_a_downgrade(pipeline_outputs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    params = load_params(pipeline_outputs / "params.yaml")
    params = replace(params, train=replace(params.train, precision="fp16"))
    with pytest.raises(PipelineError, match="fp16 needs a CUDA GPU"):
        train(params, pipeline_outputs / "data/processed", pipeline_outputs / "models/base", tmp_path / "m",
              tmp_path / "c", tmp_path / "l", tmp_path / "train.json")
    assert not (tmp_path / "m").exists()


def test_train_summary_is_written_by_the_cli(project):
    """The CLI path on a fresh directory: download and preprocess (in this process), then the train
    stage's command as a process of its own."""
    from pipeline.download import main as download_main
    from pipeline.preprocess import main as preprocess_main
    from tests.conftest import in_process, run_stage

    for command in (download_main, preprocess_main):
        ran = in_process(command, [], project)
        assert ran.returncode == 0, ran.stderr[-3000:]
    result = run_stage("train", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["steps"] == 8 and metrics["effective_batch_size"] == 4
    assert metrics["tokens_seen"] == 8 * 4 * 32 and metrics["precision"] == "fp32"
    logged_eval = (project / "dvclive/plots/metrics/eval/loss.tsv").read_text().splitlines()
    assert metrics["eval_loss"] == pytest.approx(float(logged_eval[-1].split("\t")[1]))  # the last evaluation's
    assert metrics["base_eval_loss"] == pytest.approx(float(logged_eval[1].split("\t")[1]))  # step 0: the base
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["tokens_seen"] / metrics["tokens_per_second"] == pytest.approx(
        metrics["wall_seconds"] - metrics["eval_seconds"])
    data = json.loads((project / "metrics/data.json").read_text())
    blocks = datasets.load_from_disk(str(project / "data/processed"))
    assert data["train"]["blocks"] == len(blocks["train"]) and data["block_size"] == 32 and data["add_eos"] is True


def test_same_params_give_identical_models_and_metrics(pipeline_outputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    from pipeline.tasks.causal_lm.evaluate import evaluate_models as evaluate

    out = pipeline_outputs
    params = load_params(out / "params.yaml")
    train(params, out / "data/processed", out / "models/base", tmp_path / "again", tmp_path / "ckpt", tmp_path / "live",
          tmp_path / "train.json")
    first = load_file(out / "models/finetuned/model.safetensors")
    second = load_file(tmp_path / "again/model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    args = (out / "data/processed", 8, False)
    base = out / "models/base"
    assert evaluate(base, out / "models/finetuned", *args) == evaluate(base, tmp_path / "again", *args)


def test_in_training_eval_loss_equals_the_evaluate_stage(pipeline_outputs):
    """The Trainer's eval loss counts the same targets as pipeline.evaluate (block_size - 1 per block)."""
    from pipeline.tasks.causal_lm.evaluate import evaluate_models as evaluate

    out = pipeline_outputs
    logged = float((out / "dvclive/plots/metrics/eval/loss.tsv").read_text().splitlines()[-1].split("\t")[1])
    exact = evaluate(out / "models/base", out / "models/finetuned", out / "data/processed", 8, False)
    assert logged == pytest.approx(exact["validation"]["finetuned"]["loss"], rel=1e-5)


def test_the_saved_tokenizer_knows_the_models_context(pipeline_outputs):
    """A tokenizer from files says nothing of a context (1e30); the one saved beside the model says its
    64 positions, so a library loading the artifact truncates a long prompt as for any Hub GPT-2."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline_outputs / "models/finetuned")
    assert tokenizer.model_max_length == 64
    assert len(tokenizer("word " * 500, truncation=True)["input_ids"]) == 64


def test_model_card_loads_through_transformers_pipeline(pipeline_outputs):
    import math

    import yaml
    from transformers import pipeline

    out = pipeline_outputs / "models/finetuned"
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    ppl = meta["model-index"][0]["results"][0]["metrics"][0]
    logged = [float(r.split("\t")[1]) for r in (pipeline_outputs / "dvclive/plots/metrics/eval/loss.tsv").read_text()
              .splitlines()[1:]]
    assert ppl["type"] == "perplexity" and ppl["value"] == pytest.approx(math.exp(logged[-1]), rel=1e-4)
    assert f"| base | {logged[0]:.4f} |" in card  # step 0: the base model's validation loss
    assert "lr: 0.005" in card and "block_size: 32" in card and "## Intended use and limitations" in card
    generator = pipeline("text-generation", model=str(out))
    text = generator("The river", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The river") and len(text) > len("The river")


class HostSyncs:
    """Counts the reads of a tensor's value on the host (aten._local_scalar_dense: what .item(), a tensor's
    truth value and `x in tensor` call), each a device-to-host sync on a GPU, while it is entered."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += func is torch.ops.aten._local_scalar_dense.default
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()

    def __enter__(self) -> HostSyncs:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, tokenizer_dir, mode):
    """In an eager forward transformers read the batch on the host: with a pad token in the model's config it
    looks for padding (`pad_token_id in input_ids`), without an attention mask it looks for packed
    sequences, with one for padding; on a GPU each read stalls the host. One training step of the stage
    reads nothing back, its batches are tensors from the start (not Python lists collated every step),
    and in pad mode the loss is the one the attention mask gives: the padding is on the right, after
    every real token, and out of the loss."""
    import torch
    from transformers import default_data_collator

    from pipeline.core.loading import load_model
    from pipeline.train import make_trainer, set_up
    from pipeline.training.loss import causal_lm_loss, pad_vocab
    from tests.conftest import prepare

    root = prepare(tmp_path, tokenizer_dir, {"preprocess": {"mode": mode}, "train": {"max_steps": 2, "eval_steps": 0}})
    params = load_params(root / "params.yaml")
    s = set_up(params, root / "data/processed", root / "models/base", root / "checkpoints")
    trainer = make_trainer(s, params)
    syncs, training_step = HostSyncs(), trainer.training_step

    def counted(*args, **kwargs):  # the Trainer's step as train() runs it: forward, loss and backward
        with syncs:
            return training_step(*args, **kwargs)

    trainer.training_step = counted
    trainer.train()
    assert syncs.count == 0
    assert isinstance(trainer.train_dataset[0]["input_ids"], torch.Tensor)
    assert s.trainable.model.generation_config.pad_token_id == s.inputs.tokenizer.pad_token_id  # for generation
    if mode == "pad":  # as the model was called before: every block with its attention mask
        rows = [s.inputs.blocks["train"][i] for i in range(4)]
        plain = load_model(root / "models/base", made_by="download").eval()
        plain.loss_type, plain.loss_function = "ForCausalLM", causal_lm_loss(pad_vocab(plain, 64))
        plain.load_state_dict(trainer.model.state_dict())  # the weights as trained
        with torch.no_grad():
            masked = plain(**default_data_collator(rows)).loss
            ours = trainer.model.eval()(**trainer.data_collator([trainer.train_dataset[i] for i in range(4)])).loss
        assert ours.item() == pytest.approx(masked.item(), rel=1e-6)
