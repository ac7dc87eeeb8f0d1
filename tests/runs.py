"""Helpers for tests that run training (not a test module): a console that prints nowhere, and a
run's metrics.jsonl with and without its timing columns."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

TIMING_KEYS = ("seconds", "images_per_s")


def quiet() -> Console:
    """A console whose output goes to a string (``console.file.getvalue()``), not the terminal."""
    return Console(file=io.StringIO())


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def without_timing(rows: list[dict]) -> list[dict]:
    """The rows without the columns that differ from run to run (wall time, throughput)."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def untimed(run: Path) -> list[dict]:
    return without_timing(read_metrics(run))
