"""pipeline/tools/recipe.py: override files run as experiments, checked before DVC starts; the published
recipes and profiles mapped onto the Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.params import from_dict, merge
from pipeline.tools.recipe import apply_set_params, set_args

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples/recipes").glob("*.yaml"))


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# The published specs; per-device batches are what fits the card each recipe names (tests/test_memory.py), the
# totals (per-device x accumulation) are the specs'
EXPECTED_RECIPES = {
    "a-gpt2-medium.yaml": dict(model="gpt2-medium", learning_rate=5e-5, per_device_train_batch_size=16,
                               gradient_accumulation_steps=8, total=128, lr_scheduler_type="linear",
                               num_train_epochs=20, optim="adamw_torch", precision="auto"),
    "b-gpt2-cosine-fp16.yaml": dict(model="gpt2", learning_rate=5e-4, per_device_train_batch_size=4,
                                    evaluate_batch_size=64, gradient_accumulation_steps=128, total=512,
                                    seed=42, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                                    lr_scheduler_type="cosine", warmup_steps=1000, num_train_epochs=20,
                                    precision="fp16"),
    "c-gpt2-xl.yaml": dict(model="gpt2-xl", learning_rate=5e-7, per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, evaluate_batch_size=4, gradient_accumulation_steps=32,
                           total=128, num_train_epochs=1, activation_checkpointing=True),
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_published_recipes_map_onto_the_trainer(recipe, tmp_path):
    from pipeline.training.arguments import training_arguments
    from pipeline.training.plan import Plan

    expected = dict(EXPECTED_RECIPES[recipe.name])
    params = from_dict(merge(project_params(), yaml.safe_load(recipe.read_text())))
    # the Trainer is built in fp32 on the CPU here (no GPU); the requested precision is checked on the params
    args = training_arguments(params, Plan("fp32", "cpu", 1, 1024, 1, 1, False), tmp_path)
    assert params.model.name == expected.pop("model")
    assert params.train.precision == expected.pop("precision", "auto")
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == expected.pop("total")
    if "evaluate_batch_size" in expected:
        assert params.evaluate.batch_size == expected.pop("evaluate_batch_size")
    for name, value in expected.items():
        actual = getattr(args, name)
        assert (actual.value if hasattr(actual, "value") else actual) == pytest.approx(value), name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_that_changes_the_model_sets_its_revision(recipe):
    # params.yaml pins gpt2's commit; that commit does not exist in another model's repository
    model = yaml.safe_load(recipe.read_text()).get("model", {})
    assert model.get("name", "gpt2") == "gpt2" or "revision" in model


def test_recipes_are_complete():
    assert {p.name for p in RECIPES} == set(EXPECTED_RECIPES)


OVERRIDES = [*RECIPES, *sorted((ROOT / "examples").glob("gpu*.yaml")), ROOT / "examples/demo.yaml",
             *sorted((ROOT / "examples/data").glob("*.yaml"))]


@pytest.fixture
def fake_dvc(tmp_path) -> dict:
    """An environment whose `dvc` writes its argv, NUL-separated, to tmp_path/argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {tmp_path / "argv"}\n')
    (bin_dir / "dvc").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def run_recipe(recipe: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tools.recipe", str(recipe), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("recipe", OVERRIDES, ids=lambda p: p.relative_to(ROOT / "examples").as_posix())
def test_recipe_runs_as_an_experiment_like_its_params(recipe, fake_dvc, tmp_path):
    """`pipeline.tools.recipe F --run -S ...` runs `dvc exp run` with F's -S arguments then the user's, no shell in
    between; DVC parses each value as YAML and sets it at its dotted key, giving F merged onto params."""
    override = yaml.safe_load(recipe.read_text())
    done = run_recipe(recipe, "--run", "-S", "seed=7", env=fake_dvc)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv[:2] == ["exp", "run"] and argv[-2:] == ["-S", "seed=7"]
    args = argv[2:-2]
    params = project_params()
    for flag, assignment in zip(args[::2], args[1::2], strict=True):
        assert flag == "-S"
        key, value = assignment.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    assert args == set_args(override) and args
    assert from_dict(params) == from_dict(merge(project_params(), override))


def test_a_bad_recipe_never_reaches_dvc(fake_dvc, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  templat: '{title}'\n")
    done = run_recipe(bad, "--run", env=fake_dvc)
    assert done.returncode == 2 and not (tmp_path / "argv").exists()
    assert "data.templat is not a known parameter" in done.stderr and "Traceback" not in done.stderr
    done = run_recipe(ROOT / "examples/data/recipes.yaml", "--run", "-S", "train.max_steps=many", env=fake_dvc)
    assert done.returncode == 2 and "train.max_steps" in done.stderr and not (tmp_path / "argv").exists()
    done = run_recipe(ROOT / "examples/gpu.yaml", "-S", "seed=7", env=fake_dvc)
    assert done.returncode == 2 and "add --run" in done.stderr and not (tmp_path / "argv").exists()


def test_user_set_params_are_checked_with_the_recipe():
    """The forms `dvc exp run` takes: -S, --set-param, --set-param=, and file:key (another file: not ours)."""
    params = {"lr": 1.0, "train": {"max_steps": -1, "lora": {"r": 8}}}
    args = ("-S", "params.yaml:train.max_steps=30", "--set-param", "train.lora.r=16", "--set-param=lr=5e-4",
            "-S", "other.yaml:lr=9", "-n", "my-exp")
    # values read as DVC reads them (YAML 1.2): 5e-4 is a number, as in the experiment DVC records
    assert apply_set_params(params, args) == {"lr": 5e-4, "train": {"max_steps": 30, "lora": {"r": 16}}}
    assert params == {"lr": 1.0, "train": {"max_steps": -1, "lora": {"r": 8}}}, "the input was changed"
    with pytest.raises(PipelineError, match="expected key=value"):
        apply_set_params(params, ("-S", "lr"))


def test_every_override_file_says_how_to_run_it():
    """A recipe printed into `$(...)` loses its quotes (templates, lists break) and an invalid one would still
    start `dvc exp run` with the bare params: each file's own comment gives the command with --run."""
    for path in OVERRIDES:
        if path.name == "demo.yaml":  # merged by `make demo`, not run as an experiment
            continue
        command = f"python -m pipeline.tools.recipe {path.relative_to(ROOT).as_posix()} --run"
        assert command in path.read_text(), f"{path.name} does not say `{command}`"
