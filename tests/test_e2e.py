"""The real pipeline through DVC, as a user runs it, in a temporary git repository: dvc repro,
then an experiment that changes only lr, then dvc exp show and dvc plots."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.demo import dvc, make_workspace, run
from tests.conftest import CORPUS, TINY

pytestmark = pytest.mark.e2e

DECLARED = ["models/base/model.safetensors", "models/base/provenance.json", "data/raw/dataset_dict.json",
            "data/processed/dataset_dict.json", "models/finetuned/model.safetensors", "models/finetuned/tokenizer.json",
            "models/finetuned/README.md", "metrics/data.json", "metrics/train.json", "metrics/eval.json",
            "metrics/perplexity.json", "metrics/generate.json", "outputs/samples.jsonl",
            "outputs/samples.md", "dvclive/plots/metrics/train/loss.tsv", "dvclive/plots/metrics/eval/loss.tsv",
            "checkpoints/fingerprint.json"]


def exp_rows(workspace) -> list[dict]:
    """(name, train loss, fine-tuned perplexity, lr) of every row `dvc exp show` lists."""
    shown = json.loads(dvc(workspace, "exp", "show", "--json", capture=True).stdout)
    rows = []
    for commit in shown:
        for run_ in [commit] + [exp for e in commit.get("experiments") or [] for exp in e.get("revs", [])]:
            data = run_.get("data") or {}
            metrics, params = data.get("metrics", {}), data.get("params", {}).get("params.yaml", {}).get("data", {})
            if "metrics/train.json" in metrics:
                rows.append({"name": run_.get("name") or run_.get("rev"),
                             "train_loss": metrics["metrics/train.json"]["data"]["train_loss"],
                             "perplexity": metrics["metrics/eval.json"]["data"]["validation"]["finetuned"][
                                 "perplexity"],
                             "lr": params.get("lr")})
    return rows


def test_dvc_repro_then_an_lr_experiment(tmp_path):
    workspace = make_workspace(tmp_path / "ws", TINY)
    shutil.copytree(CORPUS, workspace / "assets/corpus")

    dvc(workspace, "repro")
    for path in DECLARED:
        assert (workspace / path).exists(), path
    lock = (workspace / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in ("download", "preprocess", "train", "evaluate", "generate"))
    baseline = json.loads((workspace / "metrics/eval.json").read_text())["validation"]
    assert baseline["finetuned"]["perplexity"] < baseline["base"]["perplexity"]
    assert "Data and pipelines are up to date" in dvc(workspace, "status", capture=True).stdout
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-q", "-m", "baseline"], workspace)

    processed = {p: p.stat().st_mtime_ns for p in (workspace / "data/processed").rglob("*") if p.is_file()}
    result = dvc(workspace, "exp", "run", "-S", "lr=5e-4", capture=True)
    log = result.stdout + result.stderr
    assert "Stage 'download' didn't change, skipping" in log
    assert "Stage 'preprocess' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    assert processed == {p: p.stat().st_mtime_ns for p in (workspace / "data/processed").rglob("*") if p.is_file()}

    rows = exp_rows(workspace)
    assert len(rows) >= 2, rows
    by_lr = {row["lr"]: row for row in rows}
    assert set(by_lr) >= {TINY["lr"], 5e-4}, rows
    assert by_lr[TINY["lr"]]["train_loss"] != by_lr[5e-4]["train_loss"]
    assert all(row["perplexity"] > 0 for row in rows)

    plots = json.loads(dvc(workspace, "plots", "show", "--json", capture=True).stdout)
    assert {"loss", "learning_rate", "perplexity"} <= set(plots["data"]), plots["data"].keys()
    files = {row["filename"] for row in plots["data"]["loss"][0]["content"]["data"]["values"]}
    assert files == {"train/loss.tsv", "eval/loss.tsv"}
