"""Resumable training: `checkpoints/` holds the Trainer's checkpoints of one run, with a fingerprint
of what made it. An interrupted `dvc repro` resumes from the newest complete checkpoint, but only
when the fingerprint (training params, data, base model) matches, so a new experiment never
continues an old one; a checkpoint counts as complete once a marker follows its files."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.common import digest, remove, write_json
from pipeline.config import Params

log = logging.getLogger("pipeline.checkpoints")
FINGERPRINT = "fingerprint.json"
COMPLETE = "checkpoint-complete.json"  # written once the Trainer has finished a checkpoint


def fingerprint(params: Params, data_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training params and the exact inputs."""
    inputs = {p.relative_to(data_dir).as_posix(): p.read_text() for p in sorted(data_dir.glob("*/state.json"))}
    for name in ("config.json", "provenance.json"):
        if (base_dir / name).exists():
            inputs[name] = (base_dir / name).read_text()
    return digest({"train": asdict(params.train), "lr": params.lr, "seed": params.seed, "inputs": inputs})


def resume_checkpoint(checkpoints: Path, run_id: str) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same fingerprint, if any.
    Checkpoints without the completion marker (a run killed while saving) are skipped with a warning."""
    marker = checkpoints / FINGERPRINT
    if not checkpoints.is_dir() or not marker.exists():
        return None
    if json.loads(marker.read_text()).get("fingerprint") != run_id:
        log.info("checkpoints in %s come from other params or inputs; starting fresh", checkpoints)
        return None
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.is_dir()), key=checkpoint_step, reverse=True)
    for path in found:
        if (path / COMPLETE).exists():
            return str(path)
        log.warning("skipping %s: incomplete (the run stopped while writing it)", path)
    return None


def start_fresh(checkpoints: Path, run_id: str, attention: str) -> None:
    remove(checkpoints)
    write_json(checkpoints / FINGERPRINT, {"fingerprint": run_id, "attention": attention})


def started_with(checkpoints: Path) -> dict:
    """What the run in `checkpoints` recorded when it started (its fingerprint, its attention)."""
    return json.loads((checkpoints / FINGERPRINT).read_text())


def checkpoint_step(checkpoint: str | Path | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def mark_complete_callback() -> Any:
    """A TrainerCallback writing the completion marker after each checkpoint's files."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_json(folder / COMPLETE, {"step": state.global_step})

    return MarkComplete()
