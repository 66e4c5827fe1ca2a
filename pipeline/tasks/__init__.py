"""What differs between tasks, one package per task: `causal_lm` (continue text) and `classification` (a
label per text). Each mirrors the stages it takes part in with a module of the same name, and each such
module offers the same small interface, which the stage calls:

    preprocess.py   blocks(raw, tokenizer, params, context, csv) -> (blocks, stats, length histogram)
    train.py        labels(made, data_dir); prepare_model(params, base_dir, tokenizer, made, labels) ->
                    (model, vocab); trainer_options(model, blocks, labels, params, attention) -> the
                    Trainer's datasets, metrics and loss; card(...) -> the model card; best_metric(params);
                    finish_live_log(live_dir)
    evaluate.py     evaluate(params, base_dir, finetuned_dir, data_dir, precision) -> (metrics, plot rows)
    generate.py     generate(params, model_dir, base_dir, data_dir, out, metrics_path): writes the outputs
    report.py       headline(train, evaluation, generation) -> the summary row; summary_lines(workspace,
                    evaluation, train) -> the demo's closing lines, and where the outputs are

A stage looks its task's part up once, `task_part(params.task, "train")`, and never asks which task it runs
again; a new task is a new package with these modules (tests/test_tasks.py holds them to the interface).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("causal_lm", "classification")
DEFAULT_TASK = "causal_lm"  # what a processed folder or metrics file made before tasks were recorded holds
STAGES = ("preprocess", "train", "evaluate", "generate", "report")


def task_part(task: str, stage: str) -> ModuleType:
    """The module of `task` for `stage`: pipeline.tasks.<task>.<stage>."""
    if task not in TASKS or stage not in STAGES:
        raise ValueError(f"no part of task {task!r} for stage {stage!r}")  # params.task is checked on load
    return importlib.import_module(f"pipeline.tasks.{task}.{stage}")
