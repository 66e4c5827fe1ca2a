"""What every stage shares: the error type and its one-line CLI report, and outputs written whole
(atomic files and directories). Heavy imports (torch, transformers) stay out of here, so `--help`
and params errors answer in well under a second."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("pipeline")
IGNORE_INDEX = -100  # label value the loss skips (padding, and later prompt tokens)


class PipelineError(Exception):
    """A problem in the user's input or environment. The message names the problem and the fix."""


def stage_command(fn: Callable | None = None, *, pass_unknown_options: bool = False) -> Any:
    """Make a Click command whose PipelineErrors print as one line on stderr and exit 2.

    Any other exception is a bug and keeps its traceback. Only rank 0 logs at INFO under torchrun.
    pass_unknown_options: options the command does not know (e.g. dvc's -S) go to its arguments.
    """
    if fn is None:
        return functools.partial(stage_command, pass_unknown_options=pass_unknown_options)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not sys.stderr.isatty():  # in a log file a progress bar is a line of garbage per update
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' and the Hub's
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    settings = {"help_option_names": ["-h", "--help"], "ignore_unknown_options": pass_unknown_options}
    return click.command(context_settings=settings)(run)


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             help="Params file (see `python -m pipeline.params --help-params`).")


def is_main_process() -> bool:
    """True on the single process, or on rank 0 under torchrun: the only one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


# --- atomic outputs ------------------------------------------------------------------------------

@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path`; on success it replaces `path` in one rename.

    A killed stage leaves only a `.name.tmp-*` sibling (removed by the next run), never a
    half-written `path` for DVC to cache.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove(path)
    os.replace(tmp, path)


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
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
