"""Loading what the stages before wrote: models (safetensors only), tokenizers, saved datasets. Each
checks the directory first and says which stage makes it. Heavy imports stay inside the functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import MANIFEST, size_problem

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def rerun(made_by: str | None) -> str:
    """The fix for a damaged file: re-run the stage that wrote it, or (a folder of the user's) re-save it."""
    return f"re-run the {made_by} stage (dvc repro -f {made_by})" if made_by else "save it again with save_pretrained"


def damaged(path: Path, made_by: str | None, error: BaseException) -> PipelineError:
    """A file or folder an earlier stage wrote that a library could not read, as one line."""
    reason = " ".join(str(error).split())
    reason = reason if len(reason) <= 120 else reason[:120] + "…"
    return PipelineError(f"{path} is damaged or incomplete ({type(error).__name__}: {reason}); {rerun(made_by)}")


def check_folder(path: Path, made_by: str | None) -> None:
    """Before a library opens a folder a stage wrote: every file its manifest lists is there at the size
    written, and every JSON and Arrow file in it parses, so the error names the file. Only folders a
    stage of this pipeline wrote are checked (`made_by`); a folder of the user's (data/input) is the
    libraries' to read, their errors turned into one line by the loaders."""
    if made_by is None:
        return
    if not path.is_dir():
        raise PipelineError(f"{path} does not exist; run the {made_by} stage first (dvc repro {made_by})")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise PipelineError(f"{manifest} is missing, so {path} cannot be checked; {rerun(made_by)}")
    try:
        expected = {str(name): int(size) for name, size in read_json(manifest, made_by)["files"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise damaged(manifest, made_by, e) from None
    problem = size_problem(path, expected)
    if problem:
        raise PipelineError(f"{problem}; {rerun(made_by)}")
    for file in (path / name for name in expected):
        if file.suffix == ".json":
            read_json(file, made_by)
        elif file.suffix == ".arrow":
            check_arrow(file, made_by)


def check_arrow(path: Path, made_by: str | None) -> None:
    """An Arrow stream file (datasets' save_to_disk) whose schema reads: a damaged header is found here,
    by name, without reading the data."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            pa.ipc.open_stream(source).schema  # noqa: B018 - reading it is the check
    except (pa.ArrowException, OSError) as e:
        raise damaged(path, made_by, e) from None


def read_json(path: Path, made_by: str | None) -> Any:
    """A JSON file an earlier stage wrote, or one line naming the file and the stage to re-run."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {rerun(made_by)}") from None
    except (OSError, ValueError) as e:
        raise damaged(path, made_by, e) from None


MADE_BY = {"base": "download", "finetuned": "train"}  # the models the stages compare, and who writes them


def load_config(path: Path, trust_remote_code: bool = False, made_by: str | None = None) -> PretrainedConfig:
    """A saved model's config (config.json), or one line naming the file and the stage to re-run."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a missing or damaged config.json
        raise damaged(path / "config.json", made_by, e) from None


def context_length(config: PretrainedConfig) -> int | None:
    """A model's context in tokens (GPT-2's n_positions), None for models without a fixed one."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_saved_dataset(path: Path, made_by: str) -> DatasetDict:
    """A DatasetDict written by save_to_disk, or an error naming the stage that writes it."""
    import datasets

    if not (path / "dataset_dict.json").exists():
        raise PipelineError(f"{path} is not a saved dataset; run the {made_by} stage first (dvc repro {made_by})")
    check_folder(path, made_by)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - arrow, JSON or datasets' own errors: the files are damaged
        raise damaged(path, made_by, e) from None


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
               config_overrides: dict[str, Any] | None = None, made_by: str | None = None,
               task: str = "causal_lm", new_head: bool = False) -> PreTrainedModel:
    """Load a causal LM (task "causal_lm") or a sequence classifier ("classification") from a local
    directory, safetensors only; `config_overrides` replace fields of its config before the modules are
    built (e.g. dropout). With `new_head`, a classifier loaded from a language model gets a new head
    (`score`), logged; without it, a folder with no head is not a classifier and is refused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    check_weights(path)
    check_folder(path, made_by)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(
            path, use_safetensors=True, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            output_loading_info=True, **(config_overrides or {}))
    except Exception as e:  # noqa: BLE001 - safetensors, JSON or config errors: the files are damaged
        raise damaged(path, made_by, e) from None
    head = [name for name in info["missing_keys"] if task == "classification" and name.startswith("score.")]
    if head and not new_head:
        raise PipelineError(f"{path} is not a classifier (it has no {head[0]}): a language model, or a classifier "
                            "saved without its head; " + (rerun(made_by) + " with task: classification" if made_by
                                                          else "point --model at a classifier's folder"))
    if head:
        log.info("classification head %s newly initialised (%d labels)", ", ".join(sorted(head)),
                 model.config.num_labels)
    wrong = [name for name in info["missing_keys"] if not name.endswith("lm_head.weight") and name not in head]
    wrong += [str(key) for key in info["mismatched_keys"]]  # lm_head: tied to wte
    if wrong:
        raise damaged(path, made_by, ValueError(f"weights missing or of the wrong shape: {wrong[0]}"))
    return model


def read_tokenizer(path: Path, trust_remote_code: bool = False, made_by: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """A tokenizer saved with save_pretrained in `path`, as it is, or one line naming what is wrong."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer_config.json").exists():
        raise PipelineError(f"{path} has no tokenizer (tokenizer_config.json); "
                            + (rerun(made_by) if made_by else "point model.tokenizer at a save_pretrained directory"))
    check_folder(path, made_by)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - JSON or tokenizers' errors: the files are damaged
        raise damaged(path, made_by, e) from None
    if len(tokenizer) == 0 or not tokenizer("The text")["input_ids"]:  # tokenizer.json gone, no vocab files
        raise damaged(path, made_by, ValueError("the tokenizer has no vocabulary: is tokenizer.json missing?"))
    return tokenizer


def load_tokenizer(path: Path | str, trust_remote_code: bool = False, made_by: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory; GPT-2 has no pad token, so EOS stands in for it."""
    path = Path(path)
    tokenizer = read_tokenizer(path, trust_remote_code, made_by)
    if tokenizer.eos_token_id is None:
        raise PipelineError(f"the tokenizer in {path} has no EOS token; set tokenizer.eos_token before saving it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def saved_labels(provenance: dict, data_dir: Path) -> list[str]:
    """The label names preprocess kept in data/processed/provenance.json, or one line saying they are not
    there as it writes them (at least two distinct strings)."""
    names = provenance.get("labels")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise PipelineError(f"{data_dir / 'provenance.json'} holds no list of label names (labels: "
                            f"{str(names)[:60]}) as task: classification writes it; re-run the preprocess stage "
                            "(dvc repro -f preprocess)")
    return names
