"""What a run saves to continue as if nothing happened, and the faults it survives.

A checkpoint (``RUN/last.pt``, written atomically by rank 0) holds the weights, optimizer,
schedule, grad scaler, the epochs completed and the optimizer steps done in the current one,
the epoch's running sums, and the RNG states of every rank. The data order and each image's
augmentation are pure functions of (seed, epoch, position) (``imgrec.data.sampler``,
``imgrec.data.folder.seeded_augmentation``), so the loader needs no state of its own: a resumed
run skips the batches already read and draws what the straight run would have drawn.

Checkpoints are written at the end of every epoch, every ``checkpoint_every`` steps, every
``checkpoint_minutes`` minutes, and on SIGTERM or SIGINT (a preempted node, Ctrl-C), after which
the run stops cleanly with ``TrainingInterrupted``. A failed write (disk full) keeps the previous
checkpoint and the run goes on; the output folder's room for two checkpoints is checked before
the first step.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from imgrec.checkpoint import CHECKPOINT_NAME, METRICS_NAME, rng_state, save_checkpoint, set_rng_state
from imgrec.config import to_dict
from imgrec.engine import distributed
from imgrec.utils import atomic_write

# What a resumed run writes over: room it already has.
REPLACED_FILES = (CHECKPOINT_NAME, "model.safetensors", "backbone.safetensors")
# Optimizer state per parameter, in parameter-sized tensors: AdamW's two moments, SGD's and LARS's momentum.
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 1, "lars": 1}


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; ``--resume RUN`` continues it."""

    def __init__(self, signum: int, out: Path, epoch: int, step: int):
        self.signum, self.out = signum, out
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step} of epoch {epoch + 1} with a checkpoint; continue with --resume {out}")


class StopSignals:
    """Turns SIGTERM and SIGINT into a request the loop reads between steps (``requested``).

    A second signal of the same kind acts at once, as it would without imgrec (Ctrl-C twice stops
    a run stuck in a data read). Handlers are set only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def init_loop_state(run: Any) -> None:
    """The loop's bookkeeping on a new run: epochs and steps done, the epoch's sums, the count of
    skipped steps, when the last checkpoint was written, the stop-signal watch (``fit`` enters it)."""
    run.epoch = 0  # epochs completed
    run.step = 0  # optimizer steps done in the current epoch (a mid-epoch checkpoint's position)
    run.partial = {}  # that epoch's running sums
    run.bad_steps = 0  # non-finite steps in a row
    run.skipped_steps = 0
    run.skipped_files = 0  # unreadable files met so far, over every rank (rank 0 counts them)
    run.resume_rng = None
    run.last_save = time.monotonic()
    run.signals = StopSignals()


def save_run_checkpoint(run: Any, state: dict[str, Any]) -> bool:
    """Write ``run``'s checkpoint: ``state`` (the run's own parts: weights, EMA, best...) plus the
    loop's (optimizer, schedule, scaler, position, running sums, every rank's RNG state, config).

    Called by every rank (the RNG states are gathered); rank 0 writes. A write that fails (disk
    full, a vanished mount) is reported and the previous checkpoint kept; returns whether it worked.
    """
    ranks = distributed.gather_objects({"rng": rng_state(), "partial": dict(run.partial)})
    run.last_save = time.monotonic()
    if not distributed.is_main():
        return True
    state = {
        **state,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": run.epoch,
        "step": run.step,
        "skipped_steps": run.skipped_steps,
        "bad_steps": run.bad_steps,
        "rng": ranks[0]["rng"],
        "ranks": ranks,  # every rank's RNG states and its sums of the epoch so far
        "world_size": distributed.world_size(),
        "config": to_dict(run.config),
    }
    try:
        save_checkpoint(run.out / CHECKPOINT_NAME, state)
    except OSError as exc:
        run.console.print(
            f"warning: could not write the checkpoint {run.out / CHECKPOINT_NAME} ({exc.strerror or exc}); "
            f"the previous one is kept and training goes on. Free some space in {run.out}.",
            style="yellow",
            highlight=False,
        )
        return False
    return True


def restore_training_state(run: Any, checkpoint: dict[str, Any]) -> None:
    """Optimizer, schedule, grad scaler, position (epoch and step) and RNG states of ``checkpoint``
    into ``run`` (the weights are the caller's); metrics.jsonl rows logged after it are dropped,
    and the console says where the run continues.

    A checkpoint written in the middle of an epoch continues at its step with this rank's RNG
    state (applied by ``begin_epoch``); it needs the number of processes that wrote it, since
    the ranks' shares of the epoch depend on it.
    """
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    apply_schedule(run.optimizer, run.scheduler)
    run.epoch = checkpoint["epoch"]
    run.step = checkpoint.get("step", 0)
    run.skipped_steps, run.bad_steps = checkpoint.get("skipped_steps", 0), checkpoint.get("bad_steps", 0)
    world, saved_world = distributed.world_size(), checkpoint.get("world_size", 1)
    if run.step and world != saved_world:
        raise ValueError(
            f"{run.out / CHECKPOINT_NAME} was written by {saved_world} process(es) in the middle of epoch {run.epoch + 1}, "
            f"and this run has {world}: resume it with {saved_world} (torchrun --nproc_per_node ...), as each one's share of the epoch depends on it"
        )
    ranks = checkpoint.get("ranks") or [{"rng": checkpoint["rng"], "partial": {}}]
    own = ranks[distributed.rank()] if len(ranks) == world else ranks[0]
    set_rng_state(own["rng"])
    run.resume_rng = own["rng"] if run.step else None
    run.partial = dict(own["partial"]) if run.step else {}
    drop_rows_after(run.out / METRICS_NAME, run.epoch)
    within = f", step {run.step} of epoch {run.epoch + 1}" if run.step else ""
    run.console.print(f"resumed {run.out} after epoch {run.epoch} of {run.config.epochs}{within}", highlight=False)


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every group's rate from ``scheduler``'s position: after a resume, the schedule of this
    run (its epochs may have been raised) applies from the first resumed step."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def drop_rows_after(metrics: Path, epoch: int) -> None:
    """Remove metrics.jsonl rows of epochs after ``epoch`` (logged, then the run died before its checkpoint)."""
    if metrics.exists():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = "".join(line + "\n" for line in rows if json.loads(line)["epoch"] <= epoch)
        atomic_write(metrics, lambda f: f.write(kept.encode("utf-8")))


def step_flags(bad: torch.Tensor, stop: bool, save: bool) -> tuple[bool, bool, bool]:
    """(any rank's loss not finite, any rank asked to stop, any rank due a checkpoint): one small
    all-reduce, so that every rank skips, stops and saves at the same step."""
    flags = torch.stack([bad.float().reshape(()), torch.tensor(float(stop), device=bad.device), torch.tensor(float(save), device=bad.device)])
    bad_any, stop_any, save_any = (v > 0 for v in distributed.all_reduce(flags, op="max").tolist())
    return bad_any, stop_any, save_any


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


def run_epochs(run: Any) -> None:
    """``run.train_epochs()`` under the stop-signal watch, then the TensorBoard writer closed and
    the unreadable files, if any, reported."""
    with run.signals:
        run.train_epochs()
    if run.writer is not None:
        run.writer.close()
    if run.skipped_files:
        run.console.print(f"{run.skipped_files} unreadable file(s) were skipped; see {run.skip_log.path}", style="yellow", highlight=False)


def end_epoch(run: Any) -> None:
    """After an epoch (``run.epoch`` counts it): the checkpoint, the skipped-files log merged from
    every rank (workers are gone between epochs), and the stop a signal asked for during it."""
    run.save_checkpoint()
    merge_skip_logs(run)
    if distributed.any_rank(run.signals.requested is not None, run.device) and run.epoch < run.config.epochs:
        raise TrainingInterrupted(run.signals.requested or signal.SIGTERM, run.out, run.epoch, 0)


def merge_skip_logs(run: Any) -> None:
    """One line per unreadable file in ``RUN/skipped.jsonl``, whichever rank or worker met it
    (other ranks keep their own log, maybe on another machine; rank 0 writes the union)."""
    entries = distributed.gather_objects(run.skip_log.entries())
    if distributed.is_main():
        merged: dict[str, str] = {}
        for part in entries:
            for path, reason in part.items():
                merged.setdefault(path, reason)
        run.skip_log.write(merged)
        run.skipped_files = len(merged)


__all__ = [
    "StopSignals",
    "TrainingInterrupted",
    "apply_schedule",
    "drop_rows_after",
    "end_epoch",
    "init_loop_state",
    "check_free_space",
    "merge_skip_logs",
    "restore_training_state",
    "run_epochs",
    "save_run_checkpoint",
    "step_flags",
]
