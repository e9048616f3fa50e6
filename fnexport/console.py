"""Everything human-readable goes to stderr; stdout is kept for paths and JSON."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from rich.console import Console
from rich.logging import RichHandler

from fnexport.errors import BackendUnavailable

console = Console(stderr=True)
log = logging.getLogger("fnexport")


def setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Show a spinner while `what` runs, then log how long it took."""
    start = time.perf_counter()
    with console.status(what):
        yield
    log.info("%s (%.1f s)", what, time.perf_counter() - start)


def require(module: str, extra: str) -> ModuleType:
    """Import an optional backend, or fail with exit 3 and the install line."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(f"{module} is not installed: pip install 'fnexport[{extra}]' ({err})") from err
