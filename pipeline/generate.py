"""Stage 5, generate: sample continuations of the prompts in params from the fine-tuned model.

Each prompt is sampled under its own seed (generate.seed + prompt index), so a sample depends on
the seed and its prompt only, not on the other prompts. Writes outputs/samples.jsonl (one record
per sample) and outputs/samples.md (for people).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pipeline.common import atomic_dir, device, load_model, load_tokenizer, params_option, stage_command, write_text
from pipeline.config import GenerateConfig, load_params

log = logging.getLogger("pipeline.generate")


def generation_config(cfg: GenerateConfig, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.do_sample else {}
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                            num_return_sequences=cfg.num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)


def sample(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerateConfig) -> list[dict]:
    """One record per sample: prompt, sample index, the continuation (without the prompt)."""
    import torch

    dev = device()
    model.to(dev).eval()
    gen_config = generation_config(cfg, tokenizer)
    records = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.size(1) == 0:  # an empty prompt starts from the document boundary
            ids = torch.tensor([[tokenizer.eos_token_id]])
        torch.manual_seed(cfg.seed + i)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev),
                                 generation_config=gen_config)
        for j, seq in enumerate(out):
            records.append({"prompt": prompt, "sample": j,
                            "text": tokenizer.decode(seq[ids.size(1):], skip_special_tokens=True)})
    return records


def markdown(records: list[dict], cfg: GenerateConfig, model_dir: Path) -> str:
    lines = [f"# Samples from `{model_dir}`", "",
             f"seed {cfg.seed}, max_new_tokens {cfg.max_new_tokens}, "
             + (f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}" if cfg.do_sample else "greedy"),
             ""]
    for prompt in dict.fromkeys(r["prompt"] for r in records):
        lines += [f"## {prompt!r}", ""]
        for r in (r for r in records if r["prompt"] == prompt):
            lines += [f"**{r['sample'] + 1}.** {prompt}{r['text']}".replace("\n", "  \n"), ""]
    return "\n".join(lines)


@stage_command
@params_option
@click.option("--model", "model_dir", default="models/finetuned", show_default=True, type=click.Path(path_type=Path),
              help="Model to sample from.")
@click.option("--out", default="outputs", show_default=True, type=click.Path(path_type=Path),
              help="Directory for samples.jsonl and samples.md.")
def main(params_path: str, model_dir: Path, out: Path) -> None:
    """Sample continuations of the prompts in params (reproducible under generate.seed)."""
    params = load_params(params_path)
    cfg = params.generate
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code)
    records = sample(load_model(model_dir, params.model.trust_remote_code), tokenizer, cfg.prompts, cfg)
    settings = asdict(cfg)
    del settings["prompts"]
    with atomic_dir(out) as tmp:
        write_text(tmp / "samples.jsonl", "".join(json.dumps({**r, "params": settings}) + "\n" for r in records))
        write_text(tmp / "samples.md", markdown(records, cfg, model_dir))
    log.info("%d samples -> %s", len(records), out)


if __name__ == "__main__":
    main()
