"""The run directory's files other than the checkpoint: the folder itself (proved writable, with room
for the run), metrics.jsonl and TensorBoard, the skipped-files log of every rank.

A run writes ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one row per epoch),
``skipped.jsonl`` (unreadable files, once each), ``last.pt`` (``imgrec.engine.checkpoint``) and
what its task saves (a model directory, a backbone). Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from imgrec import distributed
from imgrec.card import BACKBONE_WEIGHTS, CHECKPOINT_NAME, MODEL_WEIGHTS
from imgrec.data.folder import SkipLog
from imgrec.utils import atomic_write

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
SKIP_LOG_NAME = "skipped.jsonl"
# What a resumed run writes over: room it already has.
REPLACED_FILES = (CHECKPOINT_NAME, MODEL_WEIGHTS, BACKBONE_WEIGHTS)
# Optimizer state per parameter, in parameter-sized tensors: AdamW's two moments, SGD's and LARS's momentum.
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 1, "lars": 1}


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it writable now, not after the first epoch (every rank: each may
    have its own disk); rank 0 clears the temporary files of writes cut short by a kill."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"imgrec" * 1024)
        probe.unlink()
        for stale in out.glob(".*.tmp-*") if distributed.is_main() else ():  # a checkpoint write cut short by a kill: never read, only space
            stale.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {out}: {exc.strerror or exc}. Pick another --out or fix its permissions.") from None
    return out


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def check_free_space(out: Path, module: torch.nn.Module, optimizer: str, *, saved: torch.nn.Module, ema: bool = False) -> None:
    """Refuse to start when ``out`` cannot hold a checkpoint of ``module`` (weights, the optimizer's
    per-parameter state, an EMA copy) being written beside the previous one, plus the weights of
    ``saved`` (the model directory): better now than after the first hours of training. The
    estimate has a 10% margin for what torch.save adds; files a resumed run will replace
    (its checkpoint, its weights) count as room."""
    checkpoint = int(1.1 * state_bytes(module) * (1 + OPTIMIZER_COPIES.get(optimizer, 2) + int(ema)))
    needed = 2 * checkpoint + int(1.1 * state_bytes(saved))
    replaced = sum(path.stat().st_size for path in out.glob("*") if path.name in REPLACED_FILES and path.is_file())
    free = shutil.disk_usage(out).free + replaced
    if free < needed:
        raise ValueError(
            f"the output folder {out} has {free / 2**20:.1f} MiB free; the run needs about {needed / 2**20:.1f} MiB "
            f"(two checkpoints of {checkpoint / 2**20:.1f} MiB while one is written, and the model directory). "
            f"Free some space or pick another --out."
        )


def open_tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install tensorboard
        return None
    return SummaryWriter(str(out / "tensorboard"))


def write_metrics(out: Path, writer: Any, row: dict[str, Any]) -> None:
    """Append ``row`` to ``out/metrics.jsonl`` and, with a TensorBoard writer, its numbers as scalars."""
    with open(out / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()


def drop_rows_after(metrics: Path, epoch: int) -> None:
    """Remove metrics.jsonl rows of epochs after ``epoch`` (logged, then the run died before its checkpoint)."""
    if metrics.exists():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = "".join(line + "\n" for line in rows if json.loads(line)["epoch"] <= epoch)
        atomic_write(metrics, lambda f: f.write(kept.encode("utf-8")))


def merge_skip_logs(skip_log: SkipLog) -> int:
    """One line per unreadable file in ``RUN/skipped.jsonl``, whichever rank or worker met it
    (other ranks keep their own log, maybe on another machine; rank 0 writes the union); returns
    how many files that is on rank 0 (0 elsewhere)."""
    entries = distributed.gather_objects(skip_log.entries())
    if not distributed.is_main():
        return 0
    merged: dict[str, str] = {}
    for part in entries:
        for path, reason in part.items():
            merged.setdefault(path, reason)
    skip_log.write(merged)
    return len(merged)


__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "OPTIMIZER_COPIES",
    "SKIP_LOG_NAME",
    "check_free_space",
    "drop_rows_after",
    "merge_skip_logs",
    "open_tensorboard",
    "prepare_output_dir",
    "state_bytes",
    "write_metrics",
]
