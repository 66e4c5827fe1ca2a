"""The stage command: a Click command whose PipelineErrors (and full disks, SIGTERM, Ctrl-C) end as one
line and exit 2, the --params option, and the checks of the processes a stage runs. Heavy imports (torch,
transformers) stay out of here, so `--help` and params errors answer in well under a second."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.core.errors import DISK_FIXES, PipelineError, one_line, shorten_path


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
            from pipeline.core.workspace import release_workspaces

            release_workspaces()

    settings = {"help_option_names": ["-h", "--help"], "ignore_unknown_options": pass_unknown_options}
    return click.command(context_settings=settings)(run)


def stop(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop, a scheduler, torchrun): unwind like Ctrl-C, so stand-ins are removed."""
    raise KeyboardInterrupt("stopped by SIGTERM")


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             help="Params file (see `python -m pipeline.tools.params --help-params`).")


def is_main_process() -> bool:
    """True on the single process, or on rank 0 under torchrun: the only one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def check_processes(key: str, count: int) -> None:
    """A count of worker processes (`key`) at most the CPU cores this process may use: more only queue."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if count > cores:
        raise PipelineError(f"params: {key} ({count}) exceeds the {cores} CPU cores this machine gives the stage; "
                            f"set it to at most {cores}")
