"""The generate stage's prompts: those of params (generate.prompts) and of a prompts file in data/prompts/
(one per line, or JSONL with a "prompt" field)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import GenerateConfig
from pipeline.core.errors import PipelineError, read_utf8


def load_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts of params, then those of prompts_file (one per line, or JSONL with "prompt")."""
    prompts = list(cfg.prompts) + (read_prompts(Path(cfg.prompts_file), "generate.prompts_file")
                                   if cfg.prompts_file else [])
    if not prompts:
        raise PipelineError("generate: no prompts; set generate.prompts or generate.prompts_file")
    return prompts


def read_prompts(path: Path, key: str) -> list[str]:
    """A prompts file: one prompt per line (.txt), or a JSON object with "prompt" per line (.jsonl)."""
    if not path.is_file():
        raise PipelineError(f"{key}: {path} does not exist; create it or set it to null")
    prompts = []
    for number, line in enumerate(read_utf8(path, key).splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                prompt = None
            if not isinstance(prompt, str):
                raise PipelineError(f"{key}: line {number} of {path} is not a JSON object with a \"prompt\" "
                                    "string") from None
            prompts.append(prompt)
        else:
            prompts.append(line)
    return prompts
