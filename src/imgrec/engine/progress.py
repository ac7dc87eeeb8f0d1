"""What a training run shows on a terminal while an epoch runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from imgrec import distributed


@contextlib.contextmanager
def epoch_progress(console: Console, description: str, total: int) -> Iterator[tuple[Progress, Any]]:
    """A per-epoch bar with loss, lr, images/s and ETA, on a terminal; yields (progress, task)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield progress, progress.add_task(description, total=total, loss="-", lr="-", rate="-")


def ranks_note() -> str:
    """The words "per rank on N ranks" for the batch in a run's first line under torch.distributed."""
    world = distributed.world_size()
    return f" per rank on {world} ranks" if world > 1 else ""


__all__ = ["epoch_progress", "ranks_note"]
