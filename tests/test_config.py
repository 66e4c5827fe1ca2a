"""pipeline/config.py: params.yaml mirrored one to one, coercion, rejection by name, recipes."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.common import PipelineError
from pipeline.config import (
    Params,
    apply_set_params,
    from_dict,
    help_lines,
    load_params,
    markdown_table,
    merge,
    set_args,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples/recipes").glob("*.yaml"))


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def keys(obj: object, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out |= keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return out


def flat(mapping: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in mapping.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "config_overrides" else {prefix + k}
    return out


def test_params_yaml_mirrors_the_config_one_to_one():
    assert flat(project_params()) == keys(Params())


def test_params_yaml_is_the_real_job():
    params = load_params(ROOT / "params.yaml")
    assert (params.model.name, params.data.dataset, params.data.config) == ("gpt2", "Salesforce/wikitext",
                                                                          "wikitext-2-raw-v1")
    assert not params.model.from_scratch and not params.model.trust_remote_code


def test_every_parameter_has_help():
    lines = help_lines()
    assert len(lines) == len(keys(Params()))
    assert all(line.split(": ", 1)[1].strip() for line in lines)


@pytest.mark.parametrize("text, expected", [("5e-4", 5e-4), ("1E-3", 1e-3), ("0.001", 1e-3), (2, 2.0)])
def test_numeric_strings_are_coerced(text, expected):
    # PyYAML reads `lr: 5e-4` (no dot) as the string "5e-4"
    assert yaml.safe_load("lr: 5e-4")["lr"] == "5e-4"
    assert from_dict({"lr": text}).lr == pytest.approx(expected)


def test_integer_fields_take_whole_numbers_written_as_floats():
    assert from_dict({"train": {"warmup_steps": "1e3"}}).train.warmup_steps == 1000
    with pytest.raises(PipelineError, match=r"train.warmup_steps must be a whole number"):
        from_dict({"train": {"warmup_steps": 2.5}})


@pytest.mark.parametrize("raw, message", [
    ({"lr": "fast"}, r"params: lr must be a number; got 'fast'"),
    ({"lr": -1e-4}, r"params: lr must be > 0.0; got -0.0001"),
    ({"lr": True}, r"params: lr must be a number"),
    ({"train": {"epochs": -1}}, r"params: train.epochs must be > 0.0; got -1"),
    ({"train": {"per_device_train_batch_size": 0}}, r"per_device_train_batch_size must be >= 1; got 0"),
    ({"train": {"lr_scheduler": "exponential"}}, r"train.lr_scheduler must be one of linear, cosine"),
    ({"train": {"epochz": 3}}, r"train.epochz is not a known parameter; did you mean train.epochs\?"),
    ({"learning_rate": 1e-3}, r"learning_rate is not a known parameter"),
    ({"model": {"from_scratch": "yes"}}, r"model.from_scratch must be true or false"),
    ({"model": "gpt2"}, r"model must be a mapping"),
    ({"generate": {"prompts": "hello"}}, r"generate.prompts must be a list of strings"),
    ({"preprocess": {"val_fraction": 1.5}}, r"preprocess.val_fraction must be < 1.0"),
    ({"generate": {"top_p": 0}}, r"generate.top_p must be > 0.0"),
    ({"model": {"config_overrides": {"n_layer": 2}}}, r"model.config_overrides is only used with"),
    ({"model": {"from_scratch": True, "config_overrides": {"n_positions": 64}}, "preprocess": {"block_size": 128}},
     r"preprocess.block_size \(128\) exceeds model.config_overrides.n_positions \(64\)"),
    ({"model": {"from_scratch": True, "config_overrides": {"n_embd": 30, "n_head": 4}}}, r"divisible by n_head"),
    ({"train": {"load_best_model_at_end": True, "eval_steps": 0}}, r"load_best_model_at_end needs eval_steps > 0"),
    ({"train": {"load_best_model_at_end": True, "eval_steps": 30, "save_steps": 50}}, r"save_steps \(50\) a multiple"),
    ({"train": {"early_stopping_patience": 3}}, r"early_stopping_patience needs train.load_best_model_at_end"),
    ({"train": {"lora": {"enabled": True}, "freeze": {"layers": 2}}}, r"train.freeze does nothing with"),
    ({"train": {"lora": {"rank": 4}}}, r"train.lora.rank is not a known parameter"),
    ({"train": {"attn_implementation": "flash"}}, r"train.attn_implementation must be one of auto, sdpa, eager"),
    ({"train": {"torch_compile": 1}}, r"train.torch_compile must be one of auto, true, false; got 1"),
    ({"train": {"torch_compile": "yes"}}, r"train.torch_compile must be one of auto, true, false"),
    ({"train": {"dropout": 1.0}}, r"train.dropout must be < 1.0"),
    ({"train": {"loss_chunk_tokens": 1024}}, r"train.loss_chunk_tokens is not a known parameter"),
    ({"train": {"report_to": ["tensorbored"]}}, r"train.report_to does not know 'tensorbored'; use azure_ml"),
    ({"train": {"report_to": ["dvclive"]}}, r"train.report_to does not know 'dvclive' \(dvclive is always on\)"),
    ({"data": {"dataset": "assets/corpus.txt"}}, r"data.dataset 'assets/corpus.txt' is a local path outside data/in"),
    ({"data": {"dataset": "/srv/text/*.txt"}}, r"data.dataset '/srv/text/\*.txt' is a local path outside data/in"),
    ({"data": {"dataset": "data/input/../notes.txt"}}, r"data.dataset .* outside data/input/; move it into"),
    ({"model": {"tokenizer": "../tokenizers/mine"}}, r"model.tokenizer '../tokenizers/mine' is a local path out"),
    ({"model": {"name": "./my-model"}}, r"model.name './my-model' is a local path outside data/input/"),
    ({"generate": {"prompts_file": "prompts.txt"}}, r"generate.prompts_file 'prompts.txt' is outside data/prompts/"),
    ({"data": {"dataset": "elsewhere/" + "x" * 200 + ".txt"}}, r"data.dataset 'elsewhere/x{70}…' is a local"),
])
def test_bad_params_are_rejected_by_name(raw, message):
    with pytest.raises(PipelineError, match=message) as error:
        from_dict(raw)
    assert "\n" not in str(error.value) and "params.yaml" in str(error.value)


@pytest.mark.parametrize("raw", [
    {"data": {"dataset": "data/input/corpus"}}, {"data": {"dataset": "data/input"}},
    {"data": {"dataset": "./data/input/notes/*.txt"}}, {"data": {"dataset": "https://example.org/corpus.txt"}},
    {"data": {"dataset": "Salesforce/wikitext"}}, {"model": {"name": "gpt2-medium", "tokenizer": "data/input/tok"}},
    {"model": {"name": "anything", "from_scratch": True}}, {"generate": {"prompts_file": "data/prompts/p.jsonl"}},
])
def test_inputs_where_dvc_tracks_them_are_accepted(raw):
    from_dict(raw)


def test_unreadable_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("lr: [1,\n")
    with pytest.raises(PipelineError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "missing.yaml")


# The published specs; per-device batches are what fits the card each recipe names (tests/test_memory.py), the
# totals (per-device x accumulation) are the specs'
EXPECTED_RECIPES = {
    "a-gpt2-medium.yaml": dict(model="gpt2-medium", learning_rate=5e-5, per_device_train_batch_size=16,
                               gradient_accumulation_steps=8, total=128, lr_scheduler_type="linear",
                               num_train_epochs=20, optim="adamw_torch", precision="auto"),
    "b-gpt2-cosine-fp16.yaml": dict(model="gpt2", learning_rate=5e-4, per_device_train_batch_size=8,
                                    evaluate_batch_size=64, gradient_accumulation_steps=64, total=512,
                                    seed=42, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                                    lr_scheduler_type="cosine", warmup_steps=1000, num_train_epochs=20,
                                    precision="fp16"),
    "c-gpt2-xl.yaml": dict(model="gpt2-xl", learning_rate=5e-7, per_device_train_batch_size=1,
                           per_device_eval_batch_size=4, evaluate_batch_size=4, gradient_accumulation_steps=128,
                           total=128, num_train_epochs=1),
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_published_recipes_map_onto_the_trainer(recipe, tmp_path):
    from pipeline.train import Plan, training_arguments

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


OVERRIDES = [*RECIPES, ROOT / "examples/gpu.yaml", ROOT / "examples/demo.yaml",
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
    return subprocess.run([sys.executable, "-m", "pipeline.config", "--recipe", str(recipe), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("recipe", OVERRIDES, ids=lambda p: p.relative_to(ROOT / "examples").as_posix())
def test_recipe_runs_as_an_experiment_like_its_params(recipe, fake_dvc, tmp_path):
    """`--recipe F --run -S ...` runs `dvc exp run` with F's -S arguments then the user's, no shell in
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
    assert apply_set_params(params, args) == {"lr": "5e-4", "train": {"max_steps": 30, "lora": {"r": 16}}}
    assert params == {"lr": 1.0, "train": {"max_steps": -1, "lora": {"r": 8}}}, "the input was changed"
    with pytest.raises(PipelineError, match="expected key=value"):
        apply_set_params(params, ("-S", "lr"))


def test_docs_run_recipes_through_the_config_module():
    """A recipe printed into `$(...)` loses its quotes (templates, lists break) and an invalid one
    still starts `dvc exp run` with the bare params: the docs use --run."""
    docs = [ROOT / "README.md", *OVERRIDES]
    uses = [line for path in docs for line in path.read_text().splitlines() if "--recipe examples/" in line]
    assert len(uses) >= 9
    assert all(re.search(r"python -m pipeline\.config --recipe examples/\S+\.yaml --run", line) for line in uses)


def test_readme_documents_every_parameter():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("--markdown) -->\n")[1].split("\n<!-- params:end")[0]
    assert table == markdown_table(), "regenerate the README table: python -m pipeline.config --markdown"
    assert all(f"| `{key}` |" in table for key in keys(Params()))
