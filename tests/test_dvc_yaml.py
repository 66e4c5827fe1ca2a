"""dvc.yaml: each stage depends on exactly the code it runs, so an edit re-runs what it can change and
nothing else; and the stages, metrics and plots it declares exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# Reading and checking params.yaml: DVC tracks the values themselves, key by key (each stage's `params:`), and
# this code only checks them, so editing it (a help text, a bound) must not re-run a training.
PARAMS_CODE = {"core.config", "core.params"}


def source(module: str) -> Path:
    """The file of a pipeline module: "train" is pipeline/train.py, the package "tasks" pipeline/tasks/__init__.py."""
    path = ROOT / "pipeline" / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(module: str) -> set[str]:
    """The pipeline modules `module` ("train", "training.plan") imports, at the top or inside functions; a
    stage's `task_part(task, "<stage>")` imports that stage's module of every task (pipeline.tasks)."""
    from pipeline.tasks import TASKS

    tree = ast.parse(source(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.removeprefix("pipeline."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline.")}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "task_part"
              and isinstance(node.args[1], ast.Constant)):
            found |= {f"tasks.{task}.{node.args[1].value}" for task in TASKS}
    return found


def runs(stage: str) -> set[str]:
    """The code a stage runs: its module and everything it imports, through any depth (not the params code)."""
    seen, todo = set(), [stage]
    while todo:
        module = todo.pop()
        if module not in seen and module not in PARAMS_CODE:
            seen.add(module)
            todo += imported(module)
    return {str(source(module).relative_to(ROOT)) for module in seen}


@pytest.mark.parametrize("stage", DVC["stages"])
def test_a_stage_depends_on_exactly_the_code_it_runs(stage):
    declared = set()
    for dep in DVC["stages"][stage]["deps"]:  # a folder: every module in it, its package docstring aside
        if dep.startswith("pipeline/"):
            folder = ROOT / dep
            declared |= ({str(p.relative_to(ROOT)) for p in folder.rglob("*.py") if p.name != "__init__.py"}
                         if folder.is_dir() else {dep})
    code = runs(stage)
    assert declared == code, f"{stage}: add {sorted(code - declared)}, drop {sorted(declared - code)}"


def test_the_stages_are_the_pipeline_in_order():
    assert list(DVC["stages"]) == ["download", "preprocess", "train", "evaluate", "generate", "report"]
    assert all(DVC["stages"][s]["cmd"].startswith(f"python -m pipeline.{s} ") for s in DVC["stages"])


def test_generate_only_params_and_files_are_generate_deps_alone():
    for stage, spec in DVC["stages"].items():
        names = [p if isinstance(p, str) else next(iter(p)) for p in spec.get("params", [])]
        reads_generate = any(name == "generate" or name.startswith("generate.") for name in names)
        assert reads_generate == (stage == "generate"), stage
        assert ("data/prompts" in spec["deps"]) == (stage == "generate"), stage
