"""Sampling ad hoc from the command line (python -m pipeline.generate --model DIR --prompt ...): params.yaml's
generate settings with the flags given over them, prompts from the flags, a file or standard input,
printed, nothing written; and a classifier's labels of the texts given (--text ...)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.core.config import GenerateConfig
from pipeline.core.loading import load_model, load_tokenizer
from pipeline.core.params import PROJECT_PARAMS, from_dict, merge, read_yaml
from pipeline.generation.prompts import read_prompts
from pipeline.generation.sampling import sample, sampling_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def ad_hoc_config(params_path: str, flags: dict[str, Any]) -> tuple[GenerateConfig, bool]:
    """generate.* of params.yaml (the defaults where there is none) with the flags given on the command
    line, checked as params are; and model.trust_remote_code."""
    overrides = {k: v for k, v in flags.items() if k != "greedy"}
    if flags.get("greedy"):
        overrides = {"num_return_sequences": 1, **overrides, "do_sample": False}
    if "stop" in overrides:
        overrides["stop"] = list(overrides["stop"])
    raw = read_yaml(params_path if Path(params_path).exists() else PROJECT_PARAMS)
    params = from_dict(merge(raw, {"generate": overrides}) if overrides else raw)
    return params.generate, params.model.trust_remote_code


def stdin_prompts() -> Iterator[str]:
    """Prompts from standard input, one per line; in a terminal, asked for one at a time."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("prompt (Ctrl-D to end)> ", err=True, nl=False)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def print_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  cfg: GenerateConfig) -> None:
    records, tokens_per_second = sample(model, tokenizer, prompts, cfg)
    for r in records:
        click.echo(f"--- {r['prompt']!r} #{r['sample'] + 1}\n{r['prompt']}{r['text']}")
    click.echo(f"({tokens_per_second:.0f} tokens/s)", err=True)


def ad_hoc(model_dir: Path, prompts: list[str], prompts_file: Path | None, cfg: GenerateConfig, trust: bool) -> None:
    """Sample the prompts given (then those of stdin where one of them is '-') and print; write nothing."""
    given = [p for p in prompts if p != "-"] + (read_prompts(prompts_file, "--prompts-file") if prompts_file else [])
    model, tokenizer = load_model(model_dir, trust, sampling_dtype(cfg)), load_tokenizer(model_dir, trust)
    if given:
        print_samples(model, tokenizer, given, cfg)
    if "-" in prompts:
        for prompt in stdin_prompts():
            print_samples(model, tokenizer, [prompt], cfg)


def ad_hoc_texts(model_dir: Path, texts: list[str], params_path: str) -> None:
    """A classifier's label and probabilities of each text given (then those of stdin where one is '-')."""
    from pipeline.tasks.classification.generate import print_predictions

    given = [t for t in texts if t != "-"] + (list(stdin_prompts()) if "-" in texts else [])
    print_predictions(model_dir, given, ad_hoc_config(params_path, {})[1])
