"""What every stage shares: the error type and its one-line CLI report (for bad input, a full or
read-only disk, SIGTERM and Ctrl-C alike). Heavy imports (torch, transformers) stay out of here, so
`--help` and params errors answer in well under a second. Writing outputs: pipeline.core.outputs."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

IGNORE_INDEX = -100  # label value the loss skips (padding, and later prompt tokens)


class PipelineError(Exception):
    """A problem in the user's input or environment. The message names the problem and the fix."""


def stage_command(fn: Callable | None = None, *, pass_unknown_options: bool = False,
                  on_stop: str = "no output is half-written; run it again") -> Any:
    """Make a Click command whose PipelineErrors print as one line of at most 400 characters on stderr and
    exit 2.

    Any other exception is a bug and keeps its traceback. Only rank 0 logs at INFO under torchrun.
    pass_unknown_options: options the command does not know (e.g. dvc's -S) go to its arguments.
    on_stop: what the line after a stop (SIGTERM, Ctrl-C) says is true of the command's outputs, and of
    running it again.
    """
    if fn is None:
        return functools.partial(stage_command, pass_unknown_options=pass_unknown_options, on_stop=on_stop)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not sys.stderr.isatty():  # in a log file a progress bar is a line of garbage per update
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' and the Hub's
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per Hub request otherwise
        # DeepSpeed's guess on a machine without a GPU ("unable to detect it"): the stages name the device
        logging.getLogger("DeepSpeed").addFilter(lambda record: "unable to detect it" not in record.getMessage())
        for library in ("huggingface_hub", "datasets"):  # they print through a handler of their own too
            logging.getLogger(library).propagate = False
        signal.signal(signal.SIGTERM, stop)
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.echo("error: " + one_line(str(e), 400 - len("error: ")), err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_FIXES:
                raise  # anything else is a bug and keeps its traceback
            where = f"{shorten_path(e.filename)}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror}; {DISK_FIXES[e.errno]} (no output was changed)", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            why = e.args[0] if e.args else "interrupted (Ctrl-C)"
            click.echo(f"{why}: {on_stop}", err=True)
            sys.exit(130 if not e.args else 128 + signal.SIGTERM)
        finally:
            from pipeline.core.outputs import release_workspaces  # the stage is over: the workspace is free

            release_workspaces()

    settings = {"help_option_names": ["-h", "--help"], "ignore_unknown_options": pass_unknown_options}
    return click.command(context_settings=settings)(run)


def stop(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop, a scheduler, torchrun): unwind like Ctrl-C, so stand-ins are removed."""
    raise KeyboardInterrupt("stopped by SIGTERM")


# errno -> the fix, for the I/O errors a user can do something about
DISK_FIXES = {
    errno.ENOSPC: "free disk space and run again", errno.EDQUOT: "free disk space (quota) and run again",
    errno.EFBIG: "the file size limit was reached (ulimit -f); raise it and run again",
    errno.EROFS: "the file system is read-only; make it writable and run again",
    errno.EACCES: "make the folder writable for this user and run again",
    errno.EPERM: "make the folder writable for this user and run again",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
}


def one_line(message: str, most: int = 400) -> str:
    """An error message as one line of at most `most` characters, cut in the middle: the problem is at the
    start and the fix at the end."""
    message = " ".join(message.split())
    if len(message) <= most:
        return message
    head = most * 2 // 3
    return message[:head] + " … " + message[-(most - head - 3):]


def shorten_path(path: Any, most: int = 120) -> str:
    text = str(path)
    return text if len(text) <= most else "…" + text[-most:]


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             help="Params file (see `python -m pipeline.tools.params --help-params`).")


def is_main_process() -> bool:
    """True on the single process, or on rank 0 under torchrun: the only one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def read_utf8(path: Any, what: str) -> str:
    """A text file's contents, or one line (`what`: the key or file kind) naming its first byte that is
    not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PipelineError(f"{what}: {path} is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8") from None


def check_processes(key: str, count: int) -> None:
    """A count of worker processes (`key`) at most the CPU cores this process may use: more only queue."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if count > cores:
        raise PipelineError(f"params: {key} ({count}) exceeds the {cores} CPU cores this machine gives the stage; "
                            f"set it to at most {cores}")


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows a float (a loss above ~709), NaN for NaN."""
    return math.exp(loss) if loss < 709.78 else (math.inf if loss == loss else math.nan)


def try_flock(path: Any, all_users: bool = False) -> int | None:
    """An exclusive flock on `path` (created if need be), without waiting: the open descriptor, made
    inheritable so an exec'd process or torchrun's workers keep holding it; None where another process
    holds it. The lock lasts until the descriptor is closed or every process holding it ends.
    all_users: a lock the runs of every user on the host contend for, so the file this process creates
    is made openable by all (0666, whatever the umask)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not os.path.exists(path):
            raise  # a folder this process may not create files in
        fd = os.open(path, os.O_RDONLY)  # another user's file: flock needs no write access
    if all_users and os.fstat(fd).st_uid == os.geteuid():
        os.fchmod(fd, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)
    return fd
