"""One run per workspace: an flock on .pipeline.lock, held while a stage runs (torchrun's workers and
the hosts of one run share it), and the flock every lock of the pipeline takes (GPUs too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError


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


WORKSPACE_LOCK = ".pipeline.lock"  # beside the outputs, in the directory the stages run in


_HELD: dict[str, int] = {}


def hold_workspace(what: str, lock: Path | str = WORKSPACE_LOCK) -> int | None:
    """Take the workspace for this stage (an flock on `lock`, held until the stage returns or its process
    ends: stage_command lets go), or one line naming the run that holds it. None (nothing taken) in
    torchrun's workers, whose agent holds it, and in a run across hosts, whose other hosts' stages share
    the workspace on purpose."""
    if "LOCAL_RANK" in os.environ or int(os.environ.get("NNODES") or os.environ.get("SLURM_NNODES") or "1") > 1:
        return None
    path = Path(lock)
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already
        return _HELD[key]
    fd = try_flock(path)  # inheritable: torchrun's workers keep it held
    if fd is None:
        holder = path.read_text(encoding="utf-8", errors="replace")[:300].strip() or "another process"
        raise PipelineError(f"{holder} is running in this workspace ({path.resolve().parent}); wait for it to "
                            f"finish or stop it, then run {what} again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what} (pid {os.getpid()})".encode(), 0)
    _HELD[key] = fd
    return fd


def release_workspaces() -> None:
    """Let go of the workspaces this process holds (its stage returned: in-process runs, tests)."""
    while _HELD:
        os.close(_HELD.popitem()[1])
