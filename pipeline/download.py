"""Stage 1, download: the base model + tokenizer to models/base/, the raw dataset to data/raw/.

The model comes from the Hub (its revision resolved to one commit before anything is fetched, and
that commit recorded), from a local directory, or is built from a GPT-2 config with a seed
(from_scratch); the tokenizer likewise. The dataset comes from the Hub, local
files or a URL (pipeline.data.sources). Each output also gets a provenance.json saying what it is.
"""

from __future__ import annotations

import logging
import math
import tempfile
import typing
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.core.cli import params_option, stage_command
from pipeline.core.config import FLOAT32_TINY, DataConfig, ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.core.loading import context_length, load_model, read_tokenizer
from pipeline.core.locations import is_local
from pipeline.core.outputs import outputs, save_dataset, write_json
from pipeline.core.params import check_heads
from pipeline.core.preamble import start_stage
from pipeline.data.hub import resolve, snapshot
from pipeline.data.sources import load_raw

if TYPE_CHECKING:
    from transformers import GPT2Config, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__spec__.name)  # under python -m, __name__ is "__main__"


# --- model ---------------------------------------------------------------------------------------

def tokenizer_source(cfg: ModelConfig) -> str:
    return cfg.tokenizer or cfg.name


def hub_commits(cfg: ModelConfig) -> dict[str, str]:
    """The commit of each Hub repo the base model is made from (the model's, unless it is built from
    scratch, and the tokenizer's), resolved before anything is downloaded. model.revision applies to
    the tokenizer when it comes from the model's own repo."""
    commits = {}
    if not cfg.from_scratch and not is_local(cfg.name):
        commits[cfg.name] = resolve(cfg.name, cfg.revision, "model", "model.name")
    tokenizer = tokenizer_source(cfg)
    if not is_local(tokenizer) and tokenizer not in commits:
        commits[tokenizer] = resolve(tokenizer, cfg.revision if tokenizer == cfg.name else None, "model",
                                     "model.tokenizer" if cfg.tokenizer else "model.name")
    return commits


def load_base_tokenizer(cfg: ModelConfig, commits: dict[str, str]) -> PreTrainedTokenizerBase:
    name = tokenizer_source(cfg)
    if is_local(name):
        return read_tokenizer(Path(name), cfg.trust_remote_code)
    key = "model.tokenizer" if cfg.tokenizer else "model.name"
    return read_tokenizer(snapshot(name, commits[name], cfg.trust_remote_code, key, weights=False),
                          cfg.trust_remote_code)


def gpt2_config(overrides: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """GPT2Config() (the 124M architecture) with overrides, sized to the tokenizer's vocabulary; every
    override checked against what GPT-2's code can build and run, and the model against free memory."""
    from transformers import GPT2Config
    from transformers.activations import ACT2FN

    defaults = GPT2Config().to_dict()
    values = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id,
              **{key: checked_override(key, value, defaults) for key, value in overrides.items()}}
    if values["vocab_size"] < len(tokenizer):
        override_error("vocab_size", f"({values['vocab_size']}) is below the tokenizer's {len(tokenizer)} tokens; "
                                     "remove it (the vocabulary is sized to the tokenizer)")
    check_heads(values.get("n_embd", defaults["n_embd"]), values.get("n_head", defaults["n_head"]))
    if values.get("activation_function", defaults["activation_function"]) not in ACT2FN:
        override_error("activation_function", f"must be one of {', '.join(sorted(ACT2FN))}")
    config = GPT2Config(**values)
    check_model_fits(config)
    return config


DTYPES = ("float32", "float16", "bfloat16")
# GPT2Config fields that must be at least 1 (sizes), in [0, 1) (dropout) or above 0
SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
FRACTIONS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
POSITIVE = ("layer_norm_epsilon", "initializer_range")


def checked_override(key: str, value: Any, defaults: dict[str, Any]) -> Any:
    """One config_overrides entry checked: a GPT2Config field, of the field's type (a whole number where a
    float goes is made one: GPT2Config's fields are typed strictly), in its range."""
    import difflib

    if key not in defaults or key in ("architectures", "transformers_version", "model_type", "_name_or_path"):
        close = difflib.get_close_matches(key, list(defaults), n=1)
        override_error(key, "is not a GPT2Config field; " + (f"did you mean {close[0]}?" if close else
                            "use n_layer, n_embd, n_head, n_positions, n_inner, resid_pdrop, ..."))
    default = defaults[key]
    if isinstance(value, float) and not (math.isfinite(value) and (value == 0 or abs(value) >= FLOAT32_TINY)):
        override_error(key, f"must be a finite number of at least 1.2e-38 in size (or 0); got {value!r}")
    if key in ("dtype", "torch_dtype"):
        if value not in DTYPES:
            override_error(key, f"must be one of {', '.join(DTYPES)}; got {value!r}")
        return value
    if value is None and default is None:
        return value  # GPT2Config's own default (n_inner: null is 4 x n_embd)
    wanted = int if key in SIZES else type(default)
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return checked_override(key, float(value), defaults)
    if default is not None or key in SIZES:
        if type(value) is not wanted:
            kind = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(wanted)
            override_error(key, f"must be {kind or type(default).__name__}; got {value!r}")
    if key in SIZES and value < 1:
        override_error(key, f"must be at least 1; got {value}")
    if key in FRACTIONS and not 0 <= value < 1:
        override_error(key, f"must be in [0, 1); got {value}")
    if key in POSITIVE and value <= 0:
        override_error(key, f"must be above 0; got {value}")
    return value


def override_error(key: str, problem: str) -> typing.NoReturn:
    raise PipelineError(f"params: model.config_overrides.{key} {problem} (fix it in params.yaml or your -S override)")


def check_model_fits(config: GPT2Config) -> None:
    """The fp32 weights of a model built from `config` (12 n_embd^2 per layer, embeddings) within free
    memory: a typo of three zeros is a clear line, not minutes of swapping or an allocator crash."""
    import psutil

    inner = config.n_inner or 4 * config.n_embd
    per_layer = 4 * config.n_embd**2 + 2 * config.n_embd * inner
    parameters = config.n_layer * per_layer + (config.vocab_size + config.n_positions) * config.n_embd
    free = psutil.virtual_memory().available  # the model is built on the CPU
    if 4 * parameters > 0.9 * free:
        raise PipelineError(f"params: model.config_overrides make a model of {parameters / 1e9:,.1f}B parameters, "
                            f"{4 * parameters / 2**30:,.1f} GiB in fp32, more than the {free / 2**30:.1f} GiB of "
                            "free memory; lower n_layer / n_embd")


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int, commits: dict[str, str]
                ) -> PreTrainedModel:
    """The base model: built from a config, or loaded from a local folder or the Hub snapshot at its commit."""
    import torch
    from transformers import GPT2LMHeadModel

    if cfg.from_scratch:
        torch.manual_seed(seed)  # same params -> same initial weights
        model = GPT2LMHeadModel(gpt2_config(cfg.config_overrides, tokenizer))
        try:  # one token through the model: whatever the checks above missed, found here and not in train
            with torch.no_grad():
                logits = model(torch.tensor([[tokenizer.eos_token_id]])).logits
        except Exception as e:  # noqa: BLE001 - any failure is the overrides'; one line, not a traceback
            raise PipelineError(f"params: model.config_overrides build a GPT-2 that cannot run "
                                f"({type(e).__name__}: {str(e)[:200]}); fix them") from None
        if not bool(torch.isfinite(logits).all()) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise PipelineError("params: model.config_overrides build a GPT-2 whose weights or outputs are not finite "
                                "(check layer_norm_epsilon and initializer_range); fix them")
        return model
    if is_local(cfg.name):
        return load_model(cfg.name, cfg.trust_remote_code)
    return load_model(snapshot(cfg.name, commits[cfg.name], cfg.trust_remote_code, "model.name"),
                      cfg.trust_remote_code)


def save_base(cfg: ModelConfig, seed: int, out: Path, commits: dict[str, str] | None = None) -> dict:
    """The base model and tokenizer saved to `out`; `commits`: hub_commits(cfg), when resolved already."""
    import transformers

    commits = hub_commits(cfg) if commits is None else commits
    tokenizer = load_base_tokenizer(cfg, commits)
    model = build_model(cfg, tokenizer, seed, commits)
    if tokenizer.eos_token_id is None:
        raise PipelineError("the tokenizer has no EOS token, which preprocess puts between documents; "
                            "choose a tokenizer with one")
    commit = None if cfg.from_scratch else commits.get(cfg.name)
    provenance = {
        "name": cfg.name, "revision": cfg.revision, "resolved_commit": commit,
        "tokenizer": tokenizer_source(cfg), "tokenizer_commit": commits.get(tokenizer_source(cfg)),
        "from_scratch": cfg.from_scratch,
        "config_overrides": cfg.config_overrides, "seed": seed if cfg.from_scratch else None,
        "parameters": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__,
    }
    model.save_pretrained(out)  # safetensors
    positions = context_length(model.config)
    if positions and tokenizer.model_max_length > positions:  # e.g. 1e30, "unset", for a tokenizer from files
        tokenizer.model_max_length = positions  # so libraries that load the artifact truncate to the context
    tokenizer.save_pretrained(out)
    write_json(out / "provenance.json", provenance)
    log.info("model: %s (%s parameters%s)", cfg.name, f"{provenance['parameters']:,}",
             ", from scratch" if cfg.from_scratch else f", commit {commit}" if commit else "")
    return provenance


# --- dataset -------------------------------------------------------------------------------------

def save_raw(cfg: DataConfig, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="download-") as scratch:  # URL downloads, repaired or streamed files
        raw, provenance = load_raw(cfg, Path(scratch))
        save_dataset(raw, out, provenance, asdict(cfg))
    log.info("dataset: %s %s", cfg.dataset, provenance["splits"])
    return provenance


# huggingface_hub (datasets' Hub files too) moves a file into its cache once it has arrived whole
@stage_command(on_stop="no output is half-written; run it again: the Hub files that arrived whole stay in the cache "
                       "and are not fetched again")
@params_option
@click.option("--model-out", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Where the base model and tokenizer are saved.")
@click.option("--data-out", default="data/raw", show_default=True, type=click.Path(path_type=Path),
              help="Where the raw dataset is saved (datasets save_to_disk).")
def main(params_path: str, model_out: Path, data_out: Path) -> None:
    """Download (or build) the base model and tokenizer, and the raw dataset."""
    params = start_stage("download", params_path)
    commits = hub_commits(params.model)  # a wrong id, revision or token fails before anything is fetched
    with outputs(model_out, data_out) as (model_tmp, data_tmp):  # in place together, or neither
        save_raw(params.data, data_tmp)  # data first: a bad path fails before a large model download
        save_base(params.model, params.seed, model_tmp, commits)
    log.info("wrote %s and %s", model_out, data_out)


if __name__ == "__main__":
    main()
