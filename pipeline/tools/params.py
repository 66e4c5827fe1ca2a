"""Check params.yaml, or describe every parameter: its key, its value in the project's params.yaml and its
help text, from the schema (pipeline/core/config.py).

    python -m pipeline.tools.params                 # check params.yaml (make params)
    python -m pipeline.tools.params --help-params   # every key, its value in params.yaml, its help
    python -m pipeline.tools.params --markdown      # the reference table of docs/params.md
"""

from __future__ import annotations

import typing
from typing import Any

import click

from pipeline.core.cli import params_option, stage_command
from pipeline.core.config import Params
from pipeline.core.params import PROJECT_PARAMS, load_params, read_yaml


def documented(cls: type = Params, values: dict | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value in the project's params.yaml, help) for every parameter."""
    values = read_yaml(PROJECT_PARAMS) if values is None else values
    rows = []
    for name, info in cls.__pydantic_fields__.items():
        inner = next((a for a in typing.get_args(info.annotation) if hasattr(a, "__pydantic_fields__")),
                     info.annotation)
        if hasattr(inner, "__pydantic_fields__"):
            rows += documented(inner, values.get(name, {}), prefix + name + ".")
        else:
            rows.append((prefix + name, values.get(name), info.description))
    return rows


def help_lines() -> list[str]:
    return [f"{key} (params.yaml: {value!r}): {text}" for key, value, text in documented()]


def markdown_table() -> str:
    """The parameter reference (docs/params.md)."""
    rows = [f"| `{key}` | `{value!r}` | {text} |" for key, value, text in documented()]
    return "\n".join(["| key | params.yaml | meaning |", "|---|---|---|", *rows])


@stage_command
@params_option
@click.option("--help-params", is_flag=True, help="Print every parameter with its value in the project's params.yaml.")
@click.option("--markdown", is_flag=True, help="Print the parameter reference as a Markdown table (docs/params.md).")
def main(params_path: str, help_params: bool, markdown: bool) -> None:
    """Validate params.yaml, or describe every parameter."""
    if help_params:
        click.echo("\n".join(help_lines()))
    elif markdown:
        click.echo(markdown_table())
    else:
        load_params(params_path)
        click.echo(f"{params_path}: ok", err=True)


if __name__ == "__main__":
    main()
