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

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import outputs, write_json
from pipeline.core.workspace import hold_workspace
from pipeline.tasks import DEFAULT_TASK, TASKS, task_part


def headline(train: dict, evaluation: dict, generation: dict) -> dict:
    """The summary row of the task the evaluation was made for (pipeline.tasks.<task>.report), rounded to
    what a comparison needs."""
    task = evaluation.get("task", DEFAULT_TASK)
    if task not in TASKS:
        raise PipelineError(f"the evaluate stage's metrics name task {task!r}, not one of {', '.join(TASKS)}; re-run "
                            "evaluate (dvc repro -f evaluate)")
    return task_part(task, "report").headline(train, evaluation, generation)


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
