"""The real pipeline through DVC, as a user runs it, in a temporary git repository, in the default shape:
the model and the dataset are Hub ids with revisions, served by a Hub on loopback (tests/hub.py). dvc
repro, the commits it ran on recorded, the run committed as the baseline, an experiment that changes
only lr, and what a user compares them with (dvc exp show, dvc exp diff, dvc plots); an edited prompt
file, which only generate reads; the pinned revisions reproducing after the branches moved on; and a
SIGKILL at a random moment of each stage. (The local-files shape runs through DVC in `make demo`.)"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc import api as dvc_api

from pipeline.tools.demo import dvc
from tests.conftest import TINY, repro, workspace_for
from tests.hub_repos import DATASET, MODEL, commit_of, jsonl, sentences, tiny_gpt2

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


def test_the_run_records_the_commits_it_ran_on(experimented, hub):
    model = json.loads((experimented / "models/base/provenance.json").read_text())
    data = json.loads((experimented / "data/raw/provenance.json").read_text())
    v1_model, v1_data = commit_of(hub, "model", MODEL, "v1"), commit_of(hub, "dataset", DATASET, "v1")
    assert model["resolved_commit"] == model["tokenizer_commit"] == v1_model != commit_of(hub, "model", MODEL, "main")
    assert data["resolved_commit"] == v1_data != commit_of(hub, "dataset", DATASET, "main")
    card = (experimented / "models/finetuned/README.md").read_text()
    assert f"base_model: {MODEL}" in card and v1_model in card and v1_data in card


def test_plots_render_offline(experimented):
    """The page dvc plots show writes needs no network: no script comes from an http(s) address."""
    page = dvc(experimented, "plots", "show", "-o", "plots-page", capture=True)
    assert "failed to load" not in page.stdout + page.stderr, page.stderr  # the classifier's plot is empty, so skipped
    html = (experimented / "plots-page/index.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=[\"']?https?:", html)
    assert "vegaEmbed" in html and html.count("<script") > 5  # the inline bundle, then one call per plot
    shown = json.loads(dvc(experimented, "plots", "show", "--json", capture=True).stdout)
    assert {"loss", "perplexity", "learning_rate", "throughput", "mfu", "grad_norm", "doc_lengths"} <= set(
        shown["data"]), shown["data"].keys()
    evals = [row["step"] for row in shown["data"]["loss"][0]["content"]["data"]["values"]
             if row["filename"] == "eval/loss.tsv"]
    assert len(evals) == len(set(evals)), evals  # one evaluation per step: the last one is not run twice


def test_pinned_revisions_reproduce_after_the_branches_move_on(experimented, hub, online, tmp_path, tokenizer_dir):
    """main of the model and of the dataset move on; download re-run gives the same outputs, so dvc.lock
    does not change and nothing downstream would re-run."""
    lock = (experimented / "dvc.lock").read_text()
    hub.commit("model", MODEL, tiny_gpt2(2, tmp_path / "v3", tokenizer_dir))
    hub.commit("dataset", DATASET, {"small/train.jsonl": jsonl(sentences(5, "raft"))})
    repro(experimented, online, "-f", "-s", "download")
    assert (experimented / "dvc.lock").read_text() == lock
    assert "Data and pipelines are up to date" in dvc(experimented, "status", capture=True).stdout


# --- SIGKILL at a random moment of each stage ----------------------------------------------------------

STAGES = ["download", "preprocess", "train", "evaluate", "generate", "report"]
SECONDS = {"download": 4, "preprocess": 4, "train": 10, "evaluate": 4, "generate": 4, "report": 2}  # about, here
SAME = {"metrics/data.json": None, "metrics/summary.json": ("ppl", "ppl_base", "eval_loss", "copied"),
        "metrics/eval.json": ("validation",)}  # what an interrupted pipeline must reproduce exactly


def stage_processes(workspace, stage: str) -> list[int]:
    """The processes running `python -m pipeline.<stage>` in this workspace."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"pipeline.{stage}" in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode() and \
                    (proc / "cwd").resolve() == workspace.resolve():
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def kill_during(workspace, env: dict, stage: str, moment: float) -> str:
    """Start `dvc repro`, wait for `stage` to start, SIGKILL dvc and the stage `moment` seconds later."""
    repro = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=workspace, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not stage_processes(workspace, stage):
        assert repro.poll() is None, f"dvc repro ended (rc {repro.returncode}) before {stage} started"
        assert time.monotonic() < deadline, f"{stage} did not start"
        time.sleep(0.02)
    time.sleep(moment)
    killed = "the stage" if stage_processes(workspace, stage) else "what ran after it"
    os.killpg(repro.pid, signal.SIGKILL)
    for pid in stage_processes(workspace, stage):  # a stage DVC started in a process group of its own
        os.kill(pid, signal.SIGKILL)
    repro.wait()
    return killed


def assert_intact(workspace) -> None:
    """Every declared output that exists is whole: folders hold every file their manifest lists at its
    size and every JSON parses; metrics files parse. (A kill in the milliseconds of a landing leaves a
    journal that the stage's next run finishes: then the outputs are not checked here.)"""
    from pipeline.core.loading import check_folder

    if list(workspace.rglob(".landing-*.json")):
        return
    for out in ["models/base", "data/raw", "data/processed", "models/finetuned", "dvclive", "outputs"]:
        if (workspace / out).exists():
            check_folder(workspace / out, made_by="the stage")
    for metrics in (workspace / "metrics").glob("*.json") if (workspace / "metrics").exists() else []:
        json.loads(metrics.read_text())


@pytest.mark.scale  # real kills of a real dvc repro: make test-scale (CI)
def test_sigkill_at_a_random_moment_of_each_stage_then_repro_gives_the_uninterrupted_metrics(experimented, online,
                                                                                             tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    moments = random.Random(seed)
    workspace = workspace_for(tmp_path_factory.mktemp("killed"))
    log = []
    for stage in STAGES:
        moment = moments.uniform(0, SECONDS[stage])
        log.append(f"{stage} at {moment:.2f} s: killed {kill_during(workspace, online, stage, moment)}")
        assert_intact(workspace)
    print("\n".join(log))  # where the kills landed (pytest -s shows it)
    repro(workspace, online)
    assert "Data and pipelines are up to date" in dvc(workspace, "status", capture=True).stdout
    for path, keys in SAME.items():
        expected = json.loads(dvc_api.read(path, repo=str(experimented), rev="HEAD"))  # the baseline's, from the cache
        got = flat(json.loads((workspace / path).read_text()))
        for key, value in flat(expected).items():
            if keys is None or key.split(".")[0] in keys:
                assert got[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), \
                    (path, key, f"seed {seed}", log)


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested JSON object as {"a.b.c": leaf}."""
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
