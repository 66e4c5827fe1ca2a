"""Resumable training: `checkpoints/<run>/` holds one run's Trainer checkpoints, named by a fingerprint
of what made it (training params, data, base model), with the run's live log (dvclive/) beside them.

An interrupted `dvc repro` resumes its run from the newest whole checkpoint: one whose completion
marker follows its files and whose files still have the sizes the marker lists. A new experiment
starts a folder of its own, so no run continues another's or deletes its checkpoints; a run that
finished (its outputs in place) is marked so, and running it again trains it again from the start.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.common import digest
from pipeline.core.config import Params
from pipeline.core.outputs import file_sizes, remove, size_problem, write_json, write_text

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
CHECKPOINT = re.compile(r"checkpoint-\d+")  # the Trainer's folder names: checkpoint-<step>
COMPLETE = "checkpoint-complete.json"  # written once the Trainer has finished a checkpoint
FINISHED = "finished.json"  # written once the run's outputs are in place
LIVE = "dvclive"  # the run's live log, copied to the stage's dvclive/ output when the run ends


def fingerprint(params: Params, data_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training params and the exact inputs."""
    inputs = {p.relative_to(data_dir).as_posix(): p.read_text() for p in sorted(data_dir.glob("*/state.json"))}
    for name in ("config.json", "provenance.json"):
        if (base_dir / name).exists():
            inputs[name] = (base_dir / name).read_text()
    return digest({"train": asdict(params.train), "lr": params.lr, "seed": params.seed, "inputs": inputs})


def run_folder(checkpoints: Path, run_id: str) -> Path:
    return checkpoints / run_id


@dataclass(frozen=True)
class RunFolder:
    """This run's checkpoints and live log (checkpoints/<fingerprint>), and the checkpoint it resumes."""

    path: Path
    fingerprint: str
    resume_from: str | None


def this_run(params: Params, data_dir: Path, base_dir: Path, checkpoints: Path) -> RunFolder:
    """The run these params, data and base model make, and the checkpoint of it to resume, if any."""
    run_id = fingerprint(params, data_dir, base_dir)
    folder = run_folder(checkpoints, run_id)
    return RunFolder(folder, run_id, resume_checkpoint(folder, run_id))


def open_run(run: RunFolder, checkpoints: Path, attention: str) -> None:
    """Start the run's folder, or trim its live log back to the checkpoint it resumes (rank 0's job)."""
    note_other_runs(checkpoints, run.path)
    if run.resume_from is None:
        start_fresh(run.path, run.fingerprint, attention)
    else:
        trim_live_log(run.path / LIVE, checkpoint_step(run.resume_from))


def resume_checkpoint(folder: Path, run_id: str) -> str | None:
    """The newest whole checkpoint of an interrupted run in `folder`, if any. Checkpoints cut short (a run
    killed while saving) or damaged since are skipped with a warning naming them."""
    started = started_with(folder)
    if started.get("fingerprint") != run_id:
        return None
    if (folder / FINISHED).exists():
        log.info("this run finished before (%s); training it again from the start", folder)
        return None
    # not transformers' get_last_checkpoint: it returns the highest-numbered folder even where its save was cut short
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and CHECKPOINT.fullmatch(p.name)),
                   key=checkpoint_step, reverse=True)  # a folder of another name (checkpoint-old) is not one
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log.warning("skipping %s: %s", path, problem)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None."""
    try:
        marker = json.loads((checkpoint / COMPLETE).read_text())
        json.loads((checkpoint / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "incomplete (the run stopped while writing it)"
    except (OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    return size_problem(checkpoint, marker.get("files") or {})


def start_fresh(folder: Path, run_id: str, attention: str) -> None:
    """Begin this run's folder (an earlier, unresumable attempt of the same run is replaced; other runs'
    folders are left alone)."""
    remove(folder)
    write_json(folder / FINGERPRINT, {"fingerprint": run_id, "attention": attention})


def started_with(folder: Path) -> dict:
    """What the run in `folder` recorded when it started (its fingerprint, its attention); {} if nothing
    readable (a folder of a killed start, or a damaged file: the run starts afresh)."""
    try:
        started = json.loads((folder / FINGERPRINT).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is unreadable; starting this run afresh", folder / FINGERPRINT)
        return {}
    return started if isinstance(started, dict) else {}


def mark_finished(folder: Path) -> None:
    write_json(folder / FINISHED, {})


def note_other_runs(checkpoints: Path, folder: Path) -> None:
    """Say what other runs' checkpoints take on disk: they are kept for resuming those runs."""
    others = [p for p in checkpoints.glob("*") if p.is_dir() and p != folder]
    if others:
        size = sum(f.stat().st_size for p in others for f in p.rglob("*") if f.is_file())
        log.info("%s also holds checkpoints of %d other run(s), %.2f GB, kept to resume them; delete the folders "
                 "you will not resume", checkpoints, len(others), size / 1e9)


def trim_live_log(live_dir: Path, step: int) -> None:
    """Before resuming at `step`: drop what the stopped run logged after its checkpoint (those steps are
    trained again), so every step has one row in the plots and one section in samples.md."""
    for tsv in live_dir.glob("plots/**/*.tsv"):
        header, *rows = tsv.read_text().splitlines(keepends=True)
        column = header.rstrip("\n").split("\t").index("step")
        write_text(tsv, header + "".join(r for r in rows if int(r.split("\t")[column]) <= step))
    samples = live_dir / "samples.md"
    if samples.exists():
        sections = samples.read_text().split("## step ")
        kept = [s for s in sections[1:] if int(s.split("\n", 1)[0]) <= step]
        write_text(samples, sections[0] + "".join("## step " + s for s in kept))


def checkpoint_step(checkpoint: str | Path | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def mark_complete_callback() -> TrainerCallback:
    """A TrainerCallback writing the completion marker, with every file's size, after each checkpoint."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_json(folder / COMPLETE, {"step": state.global_step, "files": file_sizes(folder, COMPLETE)})

    return MarkComplete()
