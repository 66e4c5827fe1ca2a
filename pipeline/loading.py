"""Loading what the stages before wrote: models (safetensors only), tokenizers, saved datasets. Each
checks the directory first and says which stage makes it. Heavy imports stay inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.common import PipelineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_saved_dataset(path: Path, made_by: str) -> Any:
    """A DatasetDict written by save_to_disk, or an error naming the stage that writes it."""
    import datasets

    if not (path / "dataset_dict.json").exists():
        raise PipelineError(f"{path} is not a saved dataset; run the {made_by} stage first (dvc repro {made_by})")
    return datasets.load_from_disk(str(path))


def check_weights(path: Path) -> None:
    """Fail with a fix unless `path` is a directory holding safetensors weights."""
    if not path.is_dir():
        raise PipelineError(f"model directory {path} does not exist; run the stage that makes it (dvc repro)")
    if not (path / "config.json").exists():
        raise PipelineError(f"{path} has no config.json; it is not a saved model (save it with save_pretrained)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise PipelineError(f"{path} holds only pickle weights (*.bin); convert them to safetensors with "
                                "model.save_pretrained(path) and retry (pickle files can run code when loaded)")
        raise PipelineError(f"{path} has no model weights (*.safetensors); re-save the model there or re-run download")


def load_model(path: Path | str, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
               config_overrides: dict[str, Any] | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory, safetensors only; `config_overrides` replace fields of
    its config before the modules are built (e.g. dropout)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_weights(path)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype or torch.float32,
                                                trust_remote_code=trust_remote_code, **(config_overrides or {}))


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory; GPT-2 has no pad token, so EOS stands in for it."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists():
        raise PipelineError(f"{path} has no tokenizer (tokenizer_config.json); re-run download (dvc repro download)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise PipelineError(f"the tokenizer in {path} has no EOS token; set tokenizer.eos_token before saving it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
