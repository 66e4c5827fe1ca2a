"""Sampling from a causal LM: the prompts (params and a prompts file), batched generation with left
padding and the KV cache (the same seed and prompts give the same samples), stop strings; and sampling
ad hoc from the command line (pipeline.generate --prompt ...), flags over params.yaml's settings."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from pipeline.common import PipelineError, read_utf8
from pipeline.config import GenerateConfig
from pipeline.device import device
from pipeline.loading import load_model, load_tokenizer
from pipeline.params import PROJECT_PARAMS, from_dict, merge, read_yaml

log = logging.getLogger("pipeline.generate")


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


def context_of(model: Any) -> int | None:
    """The model's context in tokens (GPT-2's n_positions), None for models without a fixed one."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_room(tokenizer: Any, prompts: list[str], max_new_tokens: int, context: int | None, key: str) -> None:
    """Prompts and max_new_tokens (of the params section `key`) that fit the model's context: an error
    where none can, a warning where a long prompt leaves fewer new tokens than asked."""
    if context is None:
        return
    if max_new_tokens >= context:
        raise PipelineError(f"params: {key}.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                            f"model's {context}-token context; set it below {context}")
    lengths = [len(ids) for ids in tokenizer([p or tokenizer.eos_token for p in prompts],
                                             add_special_tokens=False)["input_ids"]] or [0]
    if max(lengths) >= context:
        raise PipelineError(f"params: {key}.prompts: a prompt of {max(lengths)} tokens fills the model's "
                            f"{context}-token context; shorten it")
    if max(lengths) + max_new_tokens > context:
        log.warning("%s.max_new_tokens %d is cut to %d for the longest prompt (%d tokens): the model's context is %d "
                    "tokens", key, max_new_tokens, context - max(lengths), max(lengths), context)

def generation_config(cfg: GenerateConfig, tokenizer: Any, max_new_tokens: int | None = None) -> Any:
    from transformers import GenerationConfig

    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.do_sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=cfg.do_sample,
                            num_return_sequences=cfg.num_return_sequences, repetition_penalty=cfg.repetition_penalty,
                            no_repeat_ngram_size=cfg.no_repeat_ngram_size, stop_strings=list(cfg.stop) or None,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            use_cache=True, **sampling)

def sample(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerateConfig) -> tuple[list[dict], float]:
    """One record per sample (prompt, sample index, continuation text and token ids), and the
    generation speed in new tokens/s. Batches are seeded by position, so the same seed and prompts
    give the same samples."""
    import torch

    dev = device()
    model.to(dev).eval()
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends where generation starts
    context = context_of(model)
    check_room(tokenizer, prompts, cfg.max_new_tokens, context, "generate")
    records, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        # an empty prompt starts from the document boundary (EOS), as in training
        texts = [p if p else tokenizer.eos_token for p in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        room = context - inputs["input_ids"].shape[1] if context else cfg.max_new_tokens  # >= 1: check_room
        gen_config = generation_config(cfg, tokenizer, min(room, cfg.max_new_tokens))
        torch.manual_seed(cfg.seed + start)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=gen_config, tokenizer=tokenizer)
        seconds += time.perf_counter() - began
        width = inputs["input_ids"].shape[1]
        for row, sequence in enumerate(out):
            i = row // cfg.num_return_sequences
            continuation = [t for t in sequence[width:].tolist() if t != tokenizer.pad_token_id]
            new_tokens += len(continuation)
            prompt_ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
            records.append({"prompt": batch[i], "sample": row % cfg.num_return_sequences,
                            "text": cut_at_stop(tokenizer.decode(continuation, skip_special_tokens=True), cfg.stop),
                            "prompt_ids": prompt_ids, "ids": continuation})
    return records, new_tokens / seconds if seconds else 0.0

def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


# --- ad hoc, from the command line -------------------------------------------------------------

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

def stdin_prompts() -> Any:
    """Prompts from standard input, one per line; in a terminal, asked for one at a time."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("prompt (Ctrl-D to end)> ", err=True, nl=False)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")

def print_samples(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerateConfig) -> None:
    records, tokens_per_second = sample(model, tokenizer, prompts, cfg)
    for r in records:
        click.echo(f"--- {r['prompt']!r} #{r['sample'] + 1}\n{r['prompt']}{r['text']}")
    click.echo(f"({tokens_per_second:.0f} tokens/s)", err=True)

def ad_hoc(model_dir: Path, prompts: list[str], prompts_file: Path | None, cfg: GenerateConfig, trust: bool) -> None:
    """Sample the prompts given (then those of stdin where one of them is '-') and print; write nothing."""
    given = [p for p in prompts if p != "-"] + (read_prompts(prompts_file, "--prompts-file") if prompts_file else [])
    model, tokenizer = load_model(model_dir, trust), load_tokenizer(model_dir, trust)
    if given:
        print_samples(model, tokenizer, given, cfg)
    if "-" in prompts:
        for prompt in stdin_prompts():
            print_samples(model, tokenizer, [prompt], cfg)
