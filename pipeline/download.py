"""Stage 1, download: the base model + tokenizer to models/base/, the raw dataset to data/raw/.

The model comes from the Hub (pinned revision, resolved commit recorded), from a local directory,
or is built from a GPT-2 config with a seed (from_scratch). The dataset comes from the Hub or from
local files. Each output also gets a provenance.json saying exactly what it is.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.common import PipelineError, atomic_dir, check_weights, params_option, stage_command, write_json
from pipeline.config import DataConfig, ModelConfig, load_params

log = logging.getLogger("pipeline.download")
T = TypeVar("T")

OFFLINE_SIGNS = ("couldn't connect", "Couldn't reach", "offline", "LocalEntryNotFound", "Name or service",
                 "resolve host")
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def is_local(name: str) -> bool:
    """A path on disk (or meant to be one) rather than a Hub id like `gpt2` or `Salesforce/wikitext`."""
    return (Path(name).exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or any(c in name for c in "*?[") or Path(name).suffix in LOCAL_BUILDERS)


def from_hub(fetch: Callable[[], T], what: str) -> T:
    """Run a Hub download; turn "can't reach the Hub" and "no such repo" into one-line errors."""
    try:
        return fetch()
    except (OSError, ValueError) as e:  # transformers and datasets wrap Hub failures in OSError
        text = str(e)
        hub_off = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if hub_off or any(sign in text for sign in OFFLINE_SIGNS):
            raise PipelineError(f"cannot reach the Hugging Face Hub to fetch {what} and it is not in the local cache "
                                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); connect to the internet, "
                                "or run the offline demo with `make demo`") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise PipelineError(f"could not load {what}: {first}") from None


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
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "provenance.json", provenance)
    log.info("model: %s (%s parameters%s) -> %s", cfg.name, f"{provenance['parameters']:,}",
             ", from scratch" if cfg.from_scratch else f", commit {commit}" if commit else "", out)
    return provenance


# --- dataset -------------------------------------------------------------------------------------

def local_files(pattern: str) -> list[Path]:
    """The files a local file, directory or glob names; one type, known to the loader."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise PipelineError(f"data.dataset: no data files at {pattern!r}; give an existing file, directory or glob "
                            f"of {', '.join(LOCAL_BUILDERS)} files")
    kinds = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise PipelineError(f"data.dataset: {pattern!r} mixes or contains unsupported file types "
                            f"({', '.join(sorted({f.suffix or '(none)' for f in files}))}); use one of "
                            f"{', '.join(LOCAL_BUILDERS)}")
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_raw(cfg: DataConfig) -> tuple[Any, dict]:
    """The raw DatasetDict and what it came from."""
    import datasets

    if is_local(cfg.dataset):
        files = local_files(cfg.dataset)
        builder = LOCAL_BUILDERS[files[0].suffix]
        extra = {"sample_by": cfg.txt_sample_by} if builder == "text" else {}
        try:
            raw = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, **extra)
        except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError, ValueError) as e:
            cause = e.__cause__ or e
            raise PipelineError(f"data.dataset: could not read {cfg.dataset!r} as {builder}: "
                                f"{str(cause).strip().splitlines()[0]}; fix or remove the bad file") from None
        source = {"files": {str(f): file_sha256(f) for f in files}}
    else:
        raw = from_hub(lambda: datasets.load_dataset(cfg.dataset, cfg.config, revision=cfg.revision),
                       f"dataset {cfg.dataset!r} (config {cfg.config}, revision {cfg.revision})")
        source = {"resolved_commit": _dataset_commit(cfg)}
    if cfg.train_split not in raw:
        raise PipelineError(f"data.train_split: {cfg.train_split!r} is not a split of {cfg.dataset!r}; "
                            f"it has {', '.join(raw)}")
    provenance = {"dataset": cfg.dataset, "config": cfg.config, "revision": cfg.revision, **source,
                  "splits": {name: split.num_rows for name, split in raw.items()}, "datasets": datasets.__version__}
    return raw, provenance


def _dataset_commit(cfg: DataConfig) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.dataset, revision=cfg.revision).sha
    except Exception:  # recorded as unknown, e.g. when loading from the offline cache
        return None


def save_raw(cfg: DataConfig, out: Path) -> dict:
    raw, provenance = load_raw(cfg)
    with atomic_dir(out) as tmp:
        raw.save_to_disk(str(tmp))
        write_json(tmp / "provenance.json", provenance)
    log.info("dataset: %s %s -> %s", cfg.dataset, provenance["splits"], out)
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
    save_raw(params.data, data_out)  # data first: a bad path fails before a large model download
    save_base(params.model, params.seed, model_out)


if __name__ == "__main__":
    main()
