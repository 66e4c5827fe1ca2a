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


def imported(module: str) -> set[str]:
    """The pipeline modules `module` ("train", "training.plan") imports, at the top or inside functions."""
    tree = ast.parse((ROOT / "pipeline" / f"{module.replace('.', '/')}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.removeprefix("pipeline."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline.")}
    return found


def runs(stage: str) -> set[str]:
    """The code a stage runs: its module and everything it imports, through any depth (not the params code)."""
    seen, todo = set(), [stage]
    while todo:
        module = todo.pop()
        if module not in seen and module not in PARAMS_CODE:
            seen.add(module)
            todo += imported(module)
    return {f"pipeline/{module.replace('.', '/')}.py" for module in seen}


@pytest.mark.parametrize("stage", DVC["stages"])
def test_a_stage_depends_on_exactly_the_code_it_runs(stage):
    declared = {dep for dep in DVC["stages"][stage]["deps"] if dep.startswith("pipeline/")}
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
