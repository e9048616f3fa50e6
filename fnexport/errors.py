"""Exception types; each carries the process exit code the CLI maps it to."""


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
