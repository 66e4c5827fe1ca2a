"""Experiments from an override file (a recipe: examples/gpu.yaml, examples/recipes/*.yaml, ...).

    python -m pipeline.tools.recipe examples/gpu.yaml            # check it, print it as `dvc exp run -S` flags
    python -m pipeline.tools.recipe examples/gpu.yaml --run -S lr=1e-4   # and run it as an experiment

The recipe is merged onto params.yaml together with the `-S` flags given (in every form DVC takes) and
checked before DVC starts, so a bad recipe never reaches `dvc exp run`; then this process becomes
`dvc exp run <recipe flags> <your flags>` (no shell between, so templates and lists need no quoting).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import click
import yaml

from pipeline.core.cli import params_option, stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.params import PARAMS_FILE, from_dict, merge, read_yaml, yaml_reader


def set_args(override: dict, prefix: str = "") -> list[str]:
    """`-S key=value` arguments for `dvc exp run` equivalent to an override mapping (DVC parses each
    value as YAML)."""
    args = []
    for k, v in override.items():
        if isinstance(v, dict) and v:
            args += set_args(v, f"{prefix}{k}.")
        else:
            # One line per value: a string with newlines as a double-quoted scalar (JSON's is valid YAML)
            value = json.dumps(v) if isinstance(v, str) and "\n" in v else \
                yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            args += ["-S", f"{prefix}{k}={value}"]
    return args


def apply_set_params(params: dict, dvc_args: tuple[str, ...]) -> dict:
    """params with the `-S key=value` / `--set-param key=value` among dvc_args applied as DVC applies
    them (value parsed as YAML, set at its dotted key), so a recipe is checked with the user's flags."""
    out = merge(params, {})
    args = iter(dvc_args)
    for arg in args:
        if arg in ("-S", "--set-param"):
            assignment = next(args, "")
        elif arg.startswith("--set-param="):
            assignment = arg.split("=", 1)[1]
        else:
            continue
        key, sep, value = assignment.partition("=")
        if not sep:
            raise PipelineError(f"{arg} {assignment}: expected key=value, e.g. -S lr=5e-4")
        params_file, _, key = key.rpartition(":")  # DVC's -S other.yaml:key=value sets another file
        if params_file and Path(params_file).name != PARAMS_FILE.name:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[leaf] = yaml_reader().load(value)  # as DVC reads -S values: YAML 1.2
    return out


def exp_run(recipe_args: list[str], dvc_args: tuple[str, ...]) -> None:
    """Replace this process with `dvc exp run <recipe -S args> <dvc_args>`."""
    beside_python = Path(sys.executable).parent / "dvc"  # .venv/bin/python run without activating .venv
    dvc = shutil.which("dvc") or (str(beside_python) if beside_python.exists() else None)
    if dvc is None:
        raise PipelineError("dvc is not on PATH; run `make setup` and `source .venv/bin/activate`")
    sys.stdout.flush()
    os.execv(dvc, ["dvc", "exp", "run", *recipe_args, *dvc_args])


@stage_command(pass_unknown_options=True)
@params_option
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run_exp", is_flag=True, help="Run `dvc exp run` with the recipe's -S flags and DVC_ARGS.")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def main(params_path: str, recipe: str, run_exp: bool, dvc_args: tuple[str, ...]) -> None:
    """Check RECIPE (an override of params.yaml) with the -S flags in DVC_ARGS, print it as `dvc exp run`
    flags, or with --run run it as an experiment."""
    if dvc_args and not run_exp:
        raise PipelineError(f"unexpected arguments {' '.join(dvc_args)}; to pass them to dvc exp run, add --run")
    override = read_yaml(recipe)
    from_dict(apply_set_params(merge(read_yaml(params_path), override), dvc_args))
    if run_exp:
        exp_run(set_args(override), dvc_args)
    click.echo(" ".join(shlex.quote(arg) for arg in set_args(override)))


if __name__ == "__main__":
    main()
