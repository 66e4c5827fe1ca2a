"""pipeline/report.py: the headline row of a run, from the other stages' metrics."""

from __future__ import annotations

import json

import pytest

from pipeline.report import headline
from tests.conftest import run_stage

TRAIN = {"steady_tokens_per_second": 3538.4, "steady_mfu": 0.37612, "tokens_per_second": 3442.0, "mfu": 0.366,
         "peak_memory_gib": 3.381, "wall_seconds": 42.6}
EVAL = {"validation": {"base": {"perplexity": 48685.29, "loss": 10.793}, "finetuned": {"perplexity": 470.47,
                                                                                       "loss": 6.15374}}}
GENERATE = {"finetuned": {"copied_8gram_fraction": 0.4651}, "base": {"copied_8gram_fraction": 0.0}}


def test_headline_is_a_handful_of_rounded_numbers():
    assert headline(TRAIN, EVAL, GENERATE) == {
        "ppl": 470.47, "ppl_base": 48685.29, "ppl_gain": round(48685.29 / 470.47, 2), "eval_loss": 6.1537,
        "tokens_s": 3538, "mfu": 0.3761, "peak_gib": 3.38, "copied": 0.465, "train_min": 0.71}


def test_a_run_without_a_steady_part_reports_its_whole_run():
    row = headline({**TRAIN, "steady_tokens_per_second": None, "steady_mfu": None}, EVAL,
                   {"finetuned": {"copied_8gram_fraction": None}})
    assert row["tokens_s"] == 3442 and row["mfu"] == 0.366 and row["copied"] is None


def test_the_stage_writes_the_summary_and_names_a_missing_input(tmp_path):
    for name, content in (("train", TRAIN), ("eval", EVAL), ("generate", GENERATE)):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    args = ["--train", "train.json", "--eval", "eval.json", "--generate", "generate.json", "--out", "m/summary.json"]
    assert run_stage("report", *args, cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "m/summary.json").read_text())["ppl"] == 470.47
    (tmp_path / "eval.json").unlink()
    failed = run_stage("report", *args, cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.strip() == (
        "error: eval.json is missing or not the evaluate stage's metrics; run the stage that writes it (dvc repro)")


@pytest.mark.parametrize("bad", ["{", "[]"])
def test_broken_metrics_are_one_line(tmp_path, bad):
    for name in ("train", "eval", "generate"):
        (tmp_path / f"{name}.json").write_text(bad)
    failed = run_stage("report", "--train", "train.json", "--eval", "eval.json", "--generate", "generate.json",
                       "--out", "s.json", cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
