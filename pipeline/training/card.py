"""The model card's lineage (models/finetuned/README.md), which every task's card carries: the dataset and
its commit, whether the base model is a Hub revision, the git commit, and the dvc.lock hashes of the
inputs. Each task writes the rest of its card (pipeline.tasks.<task>.train.card) with huggingface_hub's
ModelCard.

What a card says of the base model and the data comes from the provenance the earlier stages wrote
(models/base/provenance.json, data/processed/provenance.json), so the train stage needs no model or
data params of its own."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml


def git_commit() -> str | None:
    """HEAD, with "-dirty" when the work tree has changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def lock_hashes(paths: list[str], lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """The md5 that dvc.lock records for each of `paths` (outputs of the stages before this one)."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    found = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") in paths and "md5" in out:
                found[out["path"]] = out["md5"]
    return found


@dataclass(frozen=True)
class Lineage:
    """Where a fine-tuned model comes from, as its card says it."""

    dataset: str  # the dataset's name, with its config in brackets
    data_commit: str | None  # the dataset's resolved Hub commit
    on_hub: bool  # the base model is a revision of a Hub repository (not built from a config)
    commit: str  # the git commit the pipeline ran at
    inputs: str  # the dvc.lock hashes of the base model and the data, a Markdown list


def lineage(base: dict, data: dict, inputs: dict[str, str], commit: str | None) -> Lineage:
    """The lineage from the provenance of models/base (`base`) and data/processed (`data`)."""
    source = data.get("source", {})
    return Lineage(
        dataset=source.get("dataset", "unknown") + (f" ({source['config']})" if source.get("config") else ""),
        data_commit=source.get("resolved_commit"),
        on_hub=not base.get("from_scratch") and base.get("resolved_commit") is not None,
        commit=commit or "not in a git repository",
        inputs="\n".join(f"- `{path}`: md5 `{md5}`" for path, md5 in sorted(inputs.items()))
        or "- (not run through DVC: no dvc.lock entries)")
