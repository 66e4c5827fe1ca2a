"""Stage 6, report: the headline of a run in metrics/summary.json, a handful of numbers that fit one
row of `dvc exp show` in a terminal: perplexity before and after, how many times lower, the eval loss,
steady training speed and MFU, peak memory, how much of the samples is copied, training minutes.

It is the only metrics file dvc.yaml declares, so `dvc exp show`, `dvc exp diff` and `dvc metrics diff`
compare experiments on these; the detail stays in the other stages' files (`dvc metrics show
metrics/eval.json`, or read them).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.core.common import PipelineError, stage_command
from pipeline.core.outputs import hold_workspace, outputs, write_json


def headline(train: dict, evaluation: dict, generation: dict) -> dict:
    """The summary row, rounded to what a comparison needs: the task's own figures, then throughput and
    MFU (the steady figures, after warm-up, without evaluations and saves, or the whole run's when the run
    had no steady part), peak memory and training minutes."""
    validation = evaluation["validation"]
    steady = train["steady_tokens_per_second"] is not None
    speed = {
        "tokens_s": round(train["steady_tokens_per_second"] if steady else train["tokens_per_second"]),
        "mfu": round(train["steady_mfu"] if steady else train["mfu"], 4),
        "peak_gib": round(train["peak_memory_gib"], 2),
        "train_min": round(train["wall_seconds"] / 60, 2),
    }
    if evaluation.get("task") == "classification":
        return {
            "macro_f1": round(validation["finetuned"]["macro_f1"], 4),
            "accuracy": round(validation["finetuned"]["accuracy"], 4),
            "f1_majority": round(validation["majority"]["macro_f1"], 4),  # the baselines fine-tuning must beat
            "f1_zero_shot": round(validation["zero_shot"]["macro_f1"], 4),
            "eval_loss": _rounded(train.get("eval_loss"), 4),
            **speed,
        }
    base, tuned = validation["base"]["perplexity"], validation["finetuned"]["perplexity"]
    return {
        "ppl": round(tuned, 2),
        "ppl_base": round(base, 2),
        "ppl_gain": round(base / tuned, 2),  # how many times lower fine-tuning made perplexity
        "eval_loss": round(validation["finetuned"]["loss"], 4),
        **{k: speed[k] for k in ("tokens_s", "mfu", "peak_gib")},
        "copied": _rounded(generation["finetuned"]["copied_8gram_fraction"], 3),
        "train_min": speed["train_min"],
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


NEEDED = {"train": ("steady_tokens_per_second", "steady_mfu", "tokens_per_second", "mfu", "peak_memory_gib",
                    "wall_seconds"), "evaluate": ("validation",), "generate": ("finetuned",)}


def read_metrics(path: Path, stage: str) -> dict:
    """A stage's metrics file, with the fields the headline reads, or a one-line error."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        metrics = None
    if not isinstance(metrics, dict) or not all(key in metrics for key in NEEDED[stage]):
        raise PipelineError(f"{path} is missing or not the {stage} stage's metrics; run the stage that writes it "
                            "(dvc repro)")
    return metrics


@stage_command
@click.option("--train", "train_path", default="metrics/train.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--eval", "eval_path", default="metrics/eval.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--generate", "generate_path", default="metrics/generate.json", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--out", default="metrics/summary.json", show_default=True, type=click.Path(path_type=Path),
              help="The headline metrics file (declared in dvc.yaml).")
def main(train_path: Path, eval_path: Path, generate_path: Path, out: Path) -> None:
    """Write the run's headline metrics from the train, evaluate and generate metrics."""
    hold_workspace("python -m pipeline.report")  # one run per workspace
    summary = headline(read_metrics(train_path, "train"), read_metrics(eval_path, "evaluate"),
                       read_metrics(generate_path, "generate"))
    with outputs(out) as (out_tmp,):
        write_json(out_tmp, summary)
    click.echo("  ".join(f"{k} {v}" for k, v in summary.items()), err=True)


if __name__ == "__main__":
    main()
