"""Everything human-readable goes to stderr; stdout is kept for paths and JSON."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

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


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s")


@contextmanager
def progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar with images/s and ETA on stderr while `what` runs (terminals only); yields advance(n_images).
    Then one log line with the count and rate, which is what logs and CI keep."""
    start, done = time.perf_counter(), 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(task, n)

        yield advance
    seconds = time.perf_counter() - start
    log.info("%s: %d images in %.1f s (%.0f images/s)", what, done, seconds, done / max(seconds, 1e-9))


def require(module: str, extra: str) -> ModuleType:
    """Import an optional backend, or fail with exit 3 and the install line."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(f"{module} is not installed: pip install 'fnexport[{extra}]' ({err})") from err
