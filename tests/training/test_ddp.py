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


def train_once(root, tag: str, per_device: int, processes: int, **train) -> dict:
    overrides = {"model": {"config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
                                                **NO_DROPOUT}},
                 # 5 full global batches of 4 from the 21 training blocks: the epoch's last, partial batch
                 # would be topped up with repeated blocks under DDP (accelerate's even_batches)
                 "train": {"per_device_train_batch_size": per_device, "max_steps": 5, "eval_steps": 5,
                           "save_steps": 3, "logging_steps": 1, **train}}
    params = write_params(root, overrides).rename(root / f"params-{tag}.yaml")
    result = run_stage("train", "--params", str(params), "--out", f"{tag}/model", "--checkpoints", f"{tag}/checkpoints",
                       "--live-dir", f"{tag}/dvclive", "--metrics", f"{tag}/train.json", cwd=root,
                       env={"NPROC_PER_NODE": str(processes)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / tag / "train.json").read_text())


@pytest.fixture(scope="module")
def ddp(prepared) -> dict:
    return train_once(prepared, "ddp", per_device=2, processes=2)


def test_two_processes_train_like_one(prepared, ddp):
    single = train_once(prepared, "single", per_device=4, processes=1)
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
