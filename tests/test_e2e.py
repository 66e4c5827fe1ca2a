"""The real pipeline through DVC, as a user runs it, in a temporary git repository: dvc repro, the run
committed as the baseline, an experiment that changes only lr, and what a user compares them with
(dvc exp show, dvc exp diff, dvc plots); then an edited prompt file, which only generate reads."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from pipeline.demo import commit_baseline, dvc, make_workspace
from tests.conftest import CORPUS, TINY

pytestmark = pytest.mark.e2e

DECLARED = ["models/base/model.safetensors", "models/base/provenance.json", "data/raw/dataset_dict.json",
            "data/processed/dataset_dict.json", "models/finetuned/model.safetensors", "models/finetuned/tokenizer.json",
            "models/finetuned/README.md", "metrics/data.json", "metrics/train.json", "metrics/eval.json",
            "metrics/perplexity.json", "metrics/generate.json", "metrics/summary.json", "outputs/samples.jsonl",
            "outputs/samples.md", "dvclive/plots/metrics/train/loss.tsv", "dvclive/plots/metrics/eval/loss.tsv",
            "checkpoints/*/fingerprint.json"]
HEADLINE = {"ppl", "ppl_base", "ppl_gain", "eval_loss", "tokens_s", "mfu", "peak_gib", "copied", "train_min"}


def exp_rows(workspace) -> dict[str, dict]:
    """lr -> {"name", "metrics" (metrics/summary.json), "detail"} for every row `dvc exp show --json` lists."""
    shown = json.loads(dvc(workspace, "exp", "show", "--json", capture=True).stdout)
    rows = {}
    for commit in shown:
        for run_ in [commit] + [exp for e in commit.get("experiments") or [] for exp in e.get("revs", [])]:
            data = run_.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {})
            if "metrics/summary.json" in metrics:
                rows[params.get("lr")] = {"name": run_.get("name") or run_.get("rev"), "detail": set(metrics),
                                          "metrics": metrics["metrics/summary.json"]["data"]}
    return rows


@pytest.fixture(scope="module")
def experimented(tmp_path_factory):
    """A workspace where `dvc repro` ran, was committed as the baseline, and `dvc exp run -S lr=5e-4` followed."""
    workspace = make_workspace(tmp_path_factory.mktemp("e2e") / "ws",
                               {**TINY, "generate": {**TINY["generate"], "prompts_file": "data/prompts/extra.txt"}})
    shutil.copytree(CORPUS, workspace / "data/input/corpus")
    (workspace / "data/prompts/extra.txt").write_text("The mountain\n")
    dvc(workspace, "repro")
    commit_baseline(workspace)
    ran = dvc(workspace, "exp", "run", "-S", "lr=5e-4", capture=True)
    workspace.joinpath("exp-run.log").write_text(ran.stdout + ran.stderr)
    return workspace


def test_repro_writes_every_declared_output_and_a_clean_lock(experimented):
    for path in DECLARED:
        assert list(experimented.glob(path)), path
    lock = (experimented / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in ("download", "preprocess", "train", "evaluate", "generate", "report"))
    assert "Data and pipelines are up to date" in dvc(experimented, "status", capture=True).stdout


def test_an_lr_experiment_reruns_training_only_and_compares_with_the_baseline(experimented):
    log = (experimented / "exp-run.log").read_text()
    assert "Stage 'download' didn't change, skipping" in log and "Stage 'preprocess' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'report'" in log
    rows = exp_rows(experimented)
    assert set(rows) == {TINY["lr"], 5e-4}, rows
    for row in rows.values():
        assert set(row["metrics"]) == HEADLINE and row["detail"] == {"metrics/summary.json"}
        assert row["metrics"]["ppl"] < row["metrics"]["ppl_base"] and row["metrics"]["ppl_gain"] > 1
    assert rows[TINY["lr"]]["metrics"]["eval_loss"] != rows[5e-4]["metrics"]["eval_loss"]
    assert rows[TINY["lr"]]["metrics"]["ppl_base"] == rows[5e-4]["metrics"]["ppl_base"]  # the same base model
    diff = dvc(experimented, "exp", "diff", capture=True).stdout  # the experiment (workspace) against HEAD
    assert re.search(r"metrics/summary\.json\s+eval_loss\s+[\d.]+\s+[\d.]+\s+-?[\d.]+", diff), diff
    assert re.search(r"params\.yaml\s+lr\s+0\.005\s+0\.0005\s+-0\.0045", diff), diff


@pytest.mark.parametrize("path, edit", [
    ("data/prompts/extra.txt", lambda text: text + "A storm at sea\n"),
    ("params.yaml", lambda text: text.replace("temperature: 0.8", "temperature: 0.7")),
    ("pipeline/generate.py", lambda text: text + "\n# an edit of generate's code\n"),
], ids=["prompt file", "generate param", "generate code"])
def test_a_generate_only_change_leaves_train_and_evaluate_up_to_date(experimented, path, edit):
    before = (experimented / path).read_text()
    try:
        (experimented / path).write_text(edit(before))
        assert (experimented / path).read_text() != before
        status = dvc(experimented, "status", capture=True).stdout
        assert "generate:" in status, status
        assert all(f"{stage}:" not in status for stage in ("download", "preprocess", "train", "evaluate")), status
    finally:
        (experimented / path).write_text(before)  # the workspace is shared by this module's tests


def test_plots_render_offline(experimented):
    """The page dvc plots show writes needs no network: no script comes from an http(s) address."""
    dvc(experimented, "plots", "show", "-o", "plots-page")
    html = (experimented / "plots-page/index.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=[\"']?https?:", html)
    assert "vegaEmbed" in html and html.count("<script") > 5  # the inline bundle, then one call per plot
    shown = json.loads(dvc(experimented, "plots", "show", "--json", capture=True).stdout)
    assert {"loss", "perplexity", "learning_rate", "throughput", "mfu", "grad_norm", "doc_lengths"} <= set(
        shown["data"]), shown["data"].keys()
    evals = [row["step"] for row in shown["data"]["loss"][0]["content"]["data"]["values"]
             if row["filename"] == "eval/loss.tsv"]
    assert len(evals) == len(set(evals)), evals  # one evaluation per step: the last one is not run twice
