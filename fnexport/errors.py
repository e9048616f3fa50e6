"""Exception types; each carries the process exit code the CLI maps it to."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class FnexportError(Exception):
    """A bug in fnexport: the CLI shows the traceback and asks for a report."""

    exit_code = 4


class CheckFailed(FnexportError):
    """A verification did not pass (parity gate, accuracy floor)."""

    exit_code = 1


class BadInput(FnexportError):
    """The user's checkpoint, recipe, images or flags are wrong; the message says how to fix it."""

    exit_code = 2


class BackendUnavailable(FnexportError):
    """The backend a command needs is not installed or cannot run on this machine."""

    exit_code = 3


def what_is(path: Path) -> str:
    """What is at `path`, in words for an error message: missing, a broken or looping link, a folder, a device, a file."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if path.is_symlink():
            return f"is a broken symlink (to {os.readlink(path)})"
        if err.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if not stat.S_ISREG(mode):
        return "is a device or pipe, not a file"
    return "is a file"
