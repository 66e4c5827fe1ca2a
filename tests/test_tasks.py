"""The tasks behind one interface (pipeline.tasks): every task has a module per stage it takes part in, each
with the functions the stage calls, taking the same parameters; and the stage drivers never ask which task
they run beyond looking its part up."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from pipeline.tasks import STAGES, TASKS, task_part

ROOT = Path(__file__).resolve().parents[1]
INTERFACE = {  # stage -> the functions its driver calls on the task's module
    "preprocess": ["blocks"],
    "train": ["labels", "prepare_model", "trainer_options", "best_metric", "finish_live_log", "card"],
    "evaluate": ["evaluate"],
    "generate": ["generate"],
    "report": ["headline", "summary_lines"],
}


def test_the_interface_names_every_stage_a_task_takes_part_in():
    assert set(INTERFACE) == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_every_task_offers_the_stage_the_same_functions(stage):
    shapes = {}
    for task in TASKS:
        module = task_part(task, stage)
        for name in INTERFACE[stage]:
            assert callable(getattr(module, name, None)), f"pipeline.tasks.{task}.{stage} has no {name}()"
            shapes.setdefault(name, {})[task] = len(inspect.signature(getattr(module, name)).parameters)
    for name, counts in shapes.items():
        assert len(set(counts.values())) == 1, f"{stage}.{name} takes different parameters by task: {counts}"


def test_a_stage_asks_for_no_part_of_a_task_that_is_not_one():
    with pytest.raises(ValueError, match="no part of task"):
        task_part("regression", "train")
    with pytest.raises(ValueError, match="no part of task"):
        task_part("causal_lm", "download")


def test_the_stage_drivers_look_the_task_up_and_never_branch_on_it():
    """grep -n "task ==\\|task !=\\|causal_lm\\|classification" pipeline/*.py finds nothing: a task is a package."""
    pattern = re.compile(r"task ==|task !=|causal_lm|classification")
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted((ROOT / "pipeline").glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_the_report_headline_is_the_tasks_own():
    """The evaluate stage's metrics name their task; the report stage reads the headline of that task."""
    from pipeline.core.errors import PipelineError
    from pipeline.report import headline

    train = {"steady_tokens_per_second": None, "tokens_per_second": 100.4, "steady_mfu": None, "mfu": 0.01234,
             "peak_memory_gib": 1.234, "wall_seconds": 90, "eval_loss": 0.5}
    scores = {name: {"macro_f1": f1, "accuracy": f1} for name, f1 in
              (("finetuned", 0.9), ("majority", 0.2), ("zero_shot", 0.4))}
    row = headline(train, {"task": "classification", "validation": scores}, {})
    assert row["macro_f1"] == 0.9 and row["f1_zero_shot"] == 0.4 and row["tokens_s"] == 100 and "ppl" not in row
    with pytest.raises(PipelineError, match="name task 'regression'"):
        headline(train, {"task": "regression", "validation": scores}, {})
