"""Stage 1, download: the base model + tokenizer to models/base/, the raw dataset to data/raw/.

The model comes from the Hub (pinned revision, resolved commit recorded), from a local directory,
or is built from a GPT-2 config with a seed (from_scratch). The dataset comes from the Hub, local
files or a URL (pipeline.sources). Each output also gets a provenance.json saying what it is.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import click

from pipeline.common import PipelineError, params_option, stage_command
from pipeline.config import DataConfig, ModelConfig
from pipeline.loading import check_weights
from pipeline.outputs import outputs, write_json
from pipeline.params import load_params
from pipeline.sources import from_hub, is_local, load_raw

log = logging.getLogger("pipeline.download")


# --- model ---------------------------------------------------------------------------------------

def load_base_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name
    if is_local(name):
        if not (Path(name) / "tokenizer_config.json").exists():
            raise PipelineError(f"model.tokenizer: {name} is not a saved tokenizer (no tokenizer_config.json); "
                                "point it at a save_pretrained directory or a Hub id")
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    return from_hub(lambda: AutoTokenizer.from_pretrained(name, revision=cfg.revision,
                                                          trust_remote_code=cfg.trust_remote_code),
                    f"tokenizer {name!r} (revision {cfg.revision})")


def gpt2_config(overrides: dict[str, Any], tokenizer: Any) -> Any:
    """GPT2Config() (the 124M architecture) with overrides, sized to the tokenizer's vocabulary."""
    from transformers import GPT2Config

    known = GPT2Config().to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise PipelineError(f"params: model.config_overrides.{unknown[0]} is not a GPT2Config field; "
                            "use n_layer, n_embd, n_head, n_positions, n_inner, resid_pdrop, ...")
    eos = tokenizer.eos_token_id
    return GPT2Config(**{"vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos, **overrides})


def build_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> tuple[Any, str | None]:
    """The base model and the Hub commit it came from (None for local or from-scratch models)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    if cfg.from_scratch:
        torch.manual_seed(seed)  # same params -> same initial weights
        return GPT2LMHeadModel(gpt2_config(cfg.config_overrides, tokenizer)), None
    if is_local(cfg.name):
        check_weights(Path(cfg.name))
        model = AutoModelForCausalLM.from_pretrained(cfg.name, use_safetensors=True, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
        return model, None
    model = from_hub(lambda: AutoModelForCausalLM.from_pretrained(
        cfg.name, revision=cfg.revision, use_safetensors=True, dtype=torch.float32,
        trust_remote_code=cfg.trust_remote_code), f"model {cfg.name!r} (revision {cfg.revision})")
    return model, getattr(model.config, "_commit_hash", None)


def save_base(cfg: ModelConfig, seed: int, out: Path) -> dict:
    import transformers

    tokenizer = load_base_tokenizer(cfg)
    model, commit = build_model(cfg, tokenizer, seed)
    if tokenizer.eos_token_id is None:
        raise PipelineError("the tokenizer has no EOS token, which preprocess puts between documents; "
                            "choose a tokenizer with one")
    provenance = {
        "name": cfg.name, "revision": cfg.revision, "resolved_commit": commit,
        "tokenizer": cfg.tokenizer or cfg.name, "from_scratch": cfg.from_scratch,
        "config_overrides": cfg.config_overrides, "seed": seed if cfg.from_scratch else None,
        "parameters": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__,
    }
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    write_json(out / "provenance.json", provenance)
    log.info("model: %s (%s parameters%s)", cfg.name, f"{provenance['parameters']:,}",
             ", from scratch" if cfg.from_scratch else f", commit {commit}" if commit else "")
    return provenance


# --- dataset -------------------------------------------------------------------------------------

def save_raw(cfg: DataConfig, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="download-") as scratch:  # URL downloads, repaired or streamed files
        raw, provenance = load_raw(cfg, Path(scratch))
        raw.save_to_disk(str(out))
        write_json(out / "provenance.json", provenance)
    log.info("dataset: %s %s", cfg.dataset, provenance["splits"])
    return provenance


@stage_command
@params_option
@click.option("--model-out", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Where the base model and tokenizer are saved.")
@click.option("--data-out", default="data/raw", show_default=True, type=click.Path(path_type=Path),
              help="Where the raw dataset is saved (datasets save_to_disk).")
def main(params_path: str, model_out: Path, data_out: Path) -> None:
    """Download (or build) the base model and tokenizer, and the raw dataset."""
    params = load_params(params_path)
    with outputs(model_out, data_out) as (model_tmp, data_tmp):  # in place together, or neither
        save_raw(params.data, data_tmp)  # data first: a bad path fails before a large model download
        save_base(params.model, params.seed, model_tmp)
    log.info("wrote %s and %s", model_out, data_out)


if __name__ == "__main__":
    main()
