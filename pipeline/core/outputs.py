"""Outputs written whole, and a stage's outputs put in place together.

A stage builds every declared output in a temporary sibling (`.name.tmp-*`) and `outputs()` puts them
in place only when the stage has finished, so a stage that stops (a bad value, a bad file, a full disk,
NaN, Ctrl-C, SIGTERM, SIGKILL) leaves its outputs as they were. Putting them in place is a few renames
under a journal: SIGINT and SIGTERM wait until the renames are done, and after a SIGKILL between two
renames the stage's next run finishes them from the journal before it starts, so no one ever reads a
new output beside an old one. (Renames guard against killed processes, not against power loss: nothing
is fsynced.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.common import digest
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)
JOURNAL = ".landing-{name}.json"  # beside the first output: the renames of a stage putting its outputs in place
MANIFEST = "manifest.json"  # in every directory output: its files and sizes, checked by the stages that read it


@contextmanager
def outputs(*paths: Path | str) -> Iterator[list[Path]]:
    """Temporary stand-ins (not yet created: a file or a directory, as the stage writes it) for `paths`;
    when the block ends without an error, every stand-in replaces its output, all together. On an
    error or an interruption the stand-ins are removed and the outputs stay as they were."""
    finals = [Path(p).absolute() for p in paths]
    for final in finals:
        blocked = next((folder for folder in final.parents if folder.exists() and not folder.is_dir()), None)
        if blocked:
            raise PipelineError(f"output {final}: {blocked} is a file, not a folder; choose another output path")
    for final in finals:
        recover(final)
    temporaries = [final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}" for final in finals]
    made = sorted({folder for final in finals for folder in (final.parent, *final.parent.parents)
                   if not folder.exists()}, key=lambda folder: len(folder.parts), reverse=True)
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temporaries
        missing = [final for final, tmp in zip(finals, temporaries, strict=True) if not tmp.exists()]
        if missing:
            raise RuntimeError(f"the stage did not write its output {missing[0]}")  # a bug, not a user error
        for final, tmp in zip(finals, temporaries, strict=True):
            if final.exists() and final.is_dir() != tmp.is_dir():  # never swap a folder of yours for a file
                kinds = ("a folder", "a file") if final.is_dir() else ("a file", "a folder")
                raise PipelineError(f"output {final} is {kinds[0]}, and the stage writes {kinds[1]} there; choose "
                                    "another output path or move it away")
        for tmp in temporaries:
            if tmp.is_dir():
                write_manifest(tmp)
    except BaseException:
        for tmp in temporaries:
            remove(tmp)
        for folder in made:  # deepest first: the folders made for the outputs, if nothing else is in them
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    put_in_place(list(zip(temporaries, finals, strict=True)))


def put_in_place(pairs: list[tuple[Path, Path]]) -> None:
    """Rename every stand-in onto its output under a journal, with SIGINT and SIGTERM held until done."""
    journal = pairs[0][1].parent / JOURNAL.format(name=pairs[0][1].name)
    with signals_held():
        write_json(journal, [[str(tmp), str(final)] for tmp, final in pairs])
        finish(journal)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then act as they would have. Python handlers
    rather than a signal mask: a mask holds only the calling thread's signals, and the kernel gives a
    process-wide signal to any thread that does not mask it (torch and datasets start threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; stages put their outputs in place from it
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda number, _frame: caught.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def finish(journal: Path) -> None:
    """Carry out a journal's renames (again: each is skipped once done) and delete it."""
    pairs = [(Path(tmp), Path(final)) for tmp, final in json.loads(journal.read_text())]
    for tmp, final in pairs:
        if tmp.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            if final.exists() or final.is_symlink():
                os.replace(final, old)  # a directory cannot be renamed onto a non-empty one
            os.replace(tmp, final)
    journal.unlink()
    for _, final in pairs:
        for old in final.parent.glob(f".{final.name}.old-*"):
            remove(old)


def recover(final: Path) -> None:
    """Before a stage writes `final`: finish a landing a SIGKILL interrupted, and remove stand-ins and
    replaced outputs that a stopped run left behind."""
    for journal in final.parent.glob(JOURNAL.format(name="*")):
        try:
            named = any(Path(f) == final for _, f in json.loads(journal.read_text()))
        except (OSError, ValueError, TypeError):
            named = False  # a journal cut short was never acted on: its run's outputs are the old ones
            journal.unlink(missing_ok=True)
        if named:
            log.warning("finishing the outputs of a run stopped while putting them in place (%s)", journal)
            finish(journal)
    stale = [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*"),
             *final.parent.glob("." + JOURNAL.format(name="*") + ".tmp-*")]  # a journal never put in place
    for path in stale:
        remove(path)


def save_dataset(dataset: Any, out: Path, provenance: dict, made_with: Any) -> None:
    """A DatasetDict saved to `out` (save_to_disk) beside its provenance.json. Each split's fingerprint, which
    state.json keeps, is a digest of the provenance and `made_with` (the params that shaped it), not the
    random one datasets gives a table read back from a temporary file: the same inputs and params write the
    same bytes, so DVC records the same hash on every machine and its run-cache matches."""
    for split, part in dataset.items():
        part._fingerprint = digest([provenance, made_with, split, part.num_rows])
    dataset.save_to_disk(str(out))
    write_json(out / "provenance.json", provenance)


def write_manifest(folder: Path) -> None:
    """The files of a directory output and their sizes: a reader finds a deleted or cut file by name
    (pipeline.core.loading.check_folder) instead of failing somewhere inside a library, or not at all."""
    write_json(folder / MANIFEST, {"files": file_sizes(folder, MANIFEST)})


def file_sizes(folder: Path, leave_out: str) -> dict[str, int]:
    """{path relative to folder: size} of every file in it but `leave_out` (the file the sizes go into)."""
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != leave_out}


def size_problem(folder: Path, sizes: dict[str, int]) -> str | None:
    """The first file of `sizes` (as file_sizes wrote them) missing from folder or of another size."""
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, not the {size:,} written: it is damaged"
    return None


# --- files written whole ---------------------------------------------------------------------------

def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: Path | str, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file is an ordinary output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path | str, obj: Any) -> None:
    """JSON as DVC and every reader take it: a non-finite number (an overflowed perplexity) as null."""
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
