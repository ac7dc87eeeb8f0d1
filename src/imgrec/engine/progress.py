"""What a training run shows on a terminal while an epoch runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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


def print_recipe(console: Console, choices: list[Any]) -> None:
    """The settings the recipe chose (``imgrec.recipe.Choice``), each with its reason, as a short table."""
    if not choices:
        return
    table = Table(title="recipe: what was left open, chosen from the data (a flag overrides each)", title_justify="left", box=None, padding=(0, 2, 0, 0))
    for column in ("setting", "value", "why"):
        table.add_column(column, overflow="fold")
    for choice in choices:
        value = " ".join(f"{v:g}" for v in choice.value) if isinstance(choice.value, tuple) else f"{choice.value:g}" if isinstance(choice.value, float) else str(choice.value)
        table.add_row("--" + choice.name.replace("_", "-"), value, choice.reason)
    console.print(table)


__all__ = ["epoch_progress", "print_recipe", "ranks_note"]
