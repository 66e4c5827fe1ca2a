"""Data-parallel and sharded training: the train stage under torchrun with 2 processes (gloo on CPU)
writes one model and one metrics file, and trains like 1 process with the same global batch; with
train.sharding: zero3 (DeepSpeed ZeRO-3 through the Trainer) it trains like DDP and saves an ordinary,
unpadded model that gives the same logits in this process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import needs_a_compiler, prepare, run_stage, write_params

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # dropout masks differ per process


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
    model = {"config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, **NO_DROPOUT}}
    return prepare(tmp_path_factory.mktemp("ddp"), tokenizer_dir, {"model": model})


def train_once(root, tag: str, per_device: int, processes: int, env: dict | None = None, **train) -> dict:
    overrides = {"model": {"config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
                                                **NO_DROPOUT}},
                 # 5 full global batches of 4 from the 21 training blocks: the epoch's last, partial batch
                 # would be topped up with repeated blocks under DDP (accelerate's even_batches)
                 "train": {"per_device_train_batch_size": per_device, "max_steps": 5, "eval_steps": 5,
                           "save_steps": 3, "logging_steps": 1, **train}}
    params = write_params(root, overrides).rename(root / f"params-{tag}.yaml")
    result = run_stage("train", "--params", str(params), "--out", f"{tag}/model", "--checkpoints", f"{tag}/checkpoints",
                       "--live-dir", f"{tag}/dvclive", "--metrics", f"{tag}/train.json", cwd=root,
                       env={"NPROC_PER_NODE": str(processes), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / tag / "train.json").read_text())


@pytest.fixture(scope="module")
def ddp(prepared) -> dict:
    return train_once(prepared, "ddp", per_device=2, processes=2)


@pytest.fixture(scope="module")
def single(prepared) -> dict:
    # one thread, as torchrun gives each of its workers (OMP_NUM_THREADS=1): the same device as theirs
    return train_once(prepared, "single", per_device=4, processes=1, env={"OMP_NUM_THREADS": "1"})


def test_two_processes_train_like_one(prepared, single, ddp):
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert single["effective_batch_size"] == ddp["effective_batch_size"] == 4
    assert single["tokens_seen"] == ddp["tokens_seen"]
    print(f"final train loss: 1 process {single['final_train_loss']:.6f}, 2 processes {ddp['final_train_loss']:.6f}")
    assert ddp["final_train_loss"] == pytest.approx(single["final_train_loss"], abs=1e-4)
    one, two = (load_file(prepared / tag / "model/model.safetensors") for tag in ("single", "ddp"))
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)

    # rank 0 alone wrote: one model, one checkpoint series, one row per logged step, no leftovers
    run = prepared / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "dvclive", "model", "train.json"]
    assert (run / "model/model.safetensors").exists()
    (folder,) = (run / "checkpoints").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3", "checkpoint-5", "dvclive", "fingerprint.json",
                                                        "finished.json"]
    steps = [row.split("\t")[0] for row in (run / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5"]
    assert not list(prepared.rglob(".*.tmp-*"))


def test_mfu_is_per_device(single, ddp):
    """Two processes report the MFU of one device: the run's tokens/s (both processes') against two
    devices' peaks, not one's. On a CPU a device is what one process computes on: torchrun gives each
    worker one thread and each measures its own peak with a matmul on it; the single process runs on one
    thread too. Two processes then train up to twice its tokens/s at up to its MFU: never twice its MFU,
    which is what counting both processes' tokens against one device's peak showed. Below "equal" the
    figure is noise (the all-reduce of a tiny model over gloo, the other work on the 2 shared cores), so
    only the upper side is asserted against the other run; the per-device division is asserted exactly."""
    for run in (single, ddp):
        assert run["steady_mfu"] == pytest.approx(run["steady_tokens_per_second"] * run["flops_per_token"]
                                                  / (run["world_size"] * run["device_peak_flops"]))
    print(f"steady MFU per device: 1 process {single['steady_mfu']:.4f}, 2 processes {ddp['steady_mfu']:.4f}; "
          f"tokens/s {single['steady_tokens_per_second']:,.0f} and {ddp['steady_tokens_per_second']:,.0f}")
    assert ddp["steady_mfu"] < 2**0.5 * single["steady_mfu"]  # the geometric middle of "equal" and "2x apart"


def test_bad_process_count(prepared):
    write_params(prepared, {})
    result = run_stage("train", cwd=prepared, env={"NPROC_PER_NODE": "two"})
    assert result.returncode == 2 and "NPROC_PER_NODE='two' is not a process count" in result.stderr


def logits(model_dir, block: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        return model(torch.tensor([block])).logits


@pytest.mark.scale  # DeepSpeed's engine on 2 processes: make test-scale (CI)
@needs_a_compiler
def test_zero3_trains_like_ddp_and_saves_an_ordinary_model(prepared, ddp):
    from datasets import load_from_disk

    zero3 = train_once(prepared, "zero3", per_device=2, processes=2, sharding="zero3")
    assert zero3["world_size"] == 2 and zero3["effective_batch_size"] == ddp["effective_batch_size"]
    print(f"final train loss: DDP {ddp['final_train_loss']:.6f}, ZeRO-3 {zero3['final_train_loss']:.6f}")
    assert zero3["final_train_loss"] == pytest.approx(ddp["final_train_loss"], abs=1e-4)
    assert zero3["eval_loss"] == pytest.approx(ddp["eval_loss"], abs=1e-4)
    sharded, plain = (load_file(prepared / tag / "model/model.safetensors") for tag in ("zero3", "ddp"))
    assert sorted(sharded) == sorted(plain) and sharded["transformer.wte.weight"].shape[0] == 50257  # unpadded
    assert all(sharded[k].dtype == torch.float32 and torch.allclose(sharded[k], plain[k], atol=1e-5) for k in plain)
    block = load_from_disk(str(prepared / "data/processed"))["validation"][0]["input_ids"]
    assert torch.allclose(logits(prepared / "zero3/model", block), logits(prepared / "ddp/model", block), atol=1e-4)


@pytest.mark.parametrize("sharding, overlap", [("zero2", False), ("zero3", True)])
def test_deepspeed_accumulates_and_reduces_gradients_in_fp32_with_its_own_defaults(sharding, overlap, tmp_path):
    """The config as DeepSpeed reads it, after the Trainer has filled its "auto" values for a bf16 run: the
    gradients summed over micro-batches and reduced across processes in fp32, not bf16 (8 bits of
    mantissa); overlap_comm is DeepSpeed's own default (on for ZeRO-3, off for ZeRO-2)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from pipeline.training.distributed.sharding import deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, report_to="none")
    filled = HfTrainerDeepSpeedConfig(deepspeed_config(sharding))
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)), 10)
    read = DeepSpeedConfig(filled.config)
    assert read.bfloat16_config.enabled and read.gradient_accumulation_steps == 4
    assert read.grad_accum_dtype == "fp32" and read.communication_data_type == torch.float32
    assert read.zero_config.overlap_comm is overlap


def test_ddp_looks_for_unused_parameters_only_where_the_model_has_them(tmp_path):
    """DDP's find_unused_parameters walks the autograd graph every step; the Trainer's default turns it on
    for any model without gradient checkpointing. The stage decides it from the model: one forward of a
    few tokens, its graph walked, on a 2-process DDP run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.core.params import project_params
    from pipeline.training.arguments import training_arguments
    from pipeline.training.plan import Plan, find_unused_parameters

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    blocks = [{"input_ids": list(range(32)), "labels": list(range(32))}]
    ddp, zero3 = Plan("fp32", "cpu", 2, 32, 10, 8, False), Plan("fp32", "cpu", 2, 32, 10, 8, False, "zero3")
    rng = torch.get_rng_state()
    assert not find_unused_parameters(model, ddp, blocks)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's dropout masks are not moved on
    model.unused = torch.nn.Linear(4, 4)  # trainable, and the forward never calls it
    assert find_unused_parameters(model, ddp, blocks) and not find_unused_parameters(model, zero3, blocks)
    args = training_arguments(project_params(), ddp, tmp_path, find_unused=False)
    assert args.ddp_find_unused_parameters is False


def test_ddp_gets_its_settings_from_the_stage(pipeline_outputs, tmp_path):
    """What the Trainer's accelerator hands DistributedDataParallel when train() wraps the model: gradients
    as views of the all-reduce buckets (no second copy of them), no search for unused parameters."""
    from pipeline.core.params import load_params
    from pipeline.train import make_trainer, set_up

    params = load_params(pipeline_outputs / "params.yaml")
    s = set_up(params, pipeline_outputs / "data/processed", pipeline_outputs / "models/base", tmp_path)
    assert make_trainer(s, params).accelerator.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}
