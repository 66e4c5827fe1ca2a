"""Where inputs come from, told from their names alone: a URL, a local path (which must lie where dvc.yaml
tracks it: data/input, data/prompts) or a Hub repo id."""

from __future__ import annotations

from pathlib import Path

INPUTS = Path("data/input")  # where dvc.yaml tracks local datasets, models and tokenizers (download's deps)
PROMPTS = Path("data/prompts")  # where it tracks generate.prompts_file (generate's deps)
# a local file's suffix -> the datasets builder that reads it
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                  ".parquet": "parquet"}


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def is_local(name: str) -> bool:
    """A path on disk (or meant to be one) rather than a Hub id like `gpt2` or `Salesforce/wikitext`."""
    return not is_url(name) and (
        Path(name).exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
        or any(c in name for c in "*?[") or Path(name).suffix in LOCAL_BUILDERS)


# What huggingface_hub takes as a repo id (validate_repo_id), in words for an error line
REPO_ID = ("namespace/name (or a name alone), of letters, digits, '-', '_' and '.', at most 96 characters, not "
           "starting or ending with '-' or '.'")


def is_repo_id(name: str) -> bool:
    """Whether huggingface_hub takes `name` as a repo id: it refuses blanks, control characters, '--', ... in
    its own traceback, from whichever call gets the name first."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
