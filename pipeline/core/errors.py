"""The error every stage raises for bad input or a bad environment, and how its message is kept to one
line. stage_command (pipeline.core.cli) prints it and exits 2."""

from __future__ import annotations

import errno
from typing import Any


class PipelineError(Exception):
    """A problem in the user's input or environment. The message names the problem and the fix."""


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


def read_utf8(path: Any, what: str) -> str:
    """A text file's contents, or one line (`what`: the key or file kind) naming its first byte that is
    not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PipelineError(f"{what}: {path} is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8") from None
