"""Progress bars for long work outside the training loop (verify, shards, feature extraction,
export, benchmark, evaluate): shown on a terminal, nothing when the output is piped or no console
is given (the Python API's default), so logs and scripts stay clean.

The training loop's bar, with its loss and rate fields, is ``imgrec.engine.progress``'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def shows(console: Console | None) -> bool:
    """Whether a bar would be drawn on ``console``: one is given and it is a terminal."""
    return console is not None and console.is_terminal


def track(items: Iterable[T], description: str, *, console: Console | None, total: int | None = None, unit: str = "images") -> Iterator[T]:
    """``items``, one by one, with a bar of done/total, rate and ETA on ``console`` while they are
    consumed (``total`` defaults to ``len(items)``); an item counts as done when the next one is
    asked for. The bar goes away when the loop ends, or when the generator is closed: hold it in
    ``contextlib.closing`` where it is kept in a variable and the consumer may raise.

    The bar is redrawn by the loop itself, at most ten times a second, never by a thread of its
    own: nothing runs beside the work being timed (benchmark)."""
    if not shows(console):
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:  # a stream (shards): a bar without an end
            total = None
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(f"{unit}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task(description, total=total)
        progress.refresh()
        drawn = time.monotonic()
        for item in items:
            yield item
            progress.advance(task)
            if time.monotonic() - drawn >= 0.1:
                progress.refresh()
                drawn = time.monotonic()


@contextlib.contextmanager
def activity(description: str, *, console: Console | None) -> Iterator[Any]:
    """A spinner with the time spent, for one step that has no count to show (int8 calibration)."""
    if not shows(console):
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as progress:
        yield progress.add_task(description, total=None)


__all__ = ["activity", "shows", "track"]
