"""Small helpers shared across the package."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores this process may run on (respects taskset/cgroup affinity, unlike cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
