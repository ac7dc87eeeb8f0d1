"""What every training loop shares: starting or resuming a run, the epoch of optimizer steps,
the schedule, the progress bar, the run directory.

``imgrec.engine.train`` (supervised) and ``imgrec.engine.pretrain`` (self-supervised) differ in
what a batch becomes (a loss from logits and labels, or from several views) and in what happens
after each step (EMA, a momentum teacher); ``run_epoch`` takes both as functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from imgrec.checkpoint import CHECKPOINT_NAME, load_checkpoint, set_rng_state
from imgrec.config import from_dict
from imgrec.utils import atomic_write

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"

C = TypeVar("C")


def start_or_resume(
    cls: type[C], config: C | None, resume: str | os.PathLike | None, overrides: dict[str, Any], *, no_data: str, fixed: dict[str, Any] | None = None
) -> tuple[C, dict[str, Any] | None]:
    """(config, checkpoint or None) for a new run, or for ``resume=RUN`` continuing RUN's own config.

    On resume, ``overrides`` (epochs, device, workers...) and ``fixed`` go over the checkpoint's
    config. A new run must have data (``no_data`` is the message otherwise) and an ``out`` that
    holds no run yet.
    """
    checkpoint = None
    if resume is not None:
        if config is not None:
            raise ValueError("pass either a config or resume=RUN (which continues with the run's own config), not both")
        checkpoint = load_checkpoint(Path(resume) / CHECKPOINT_NAME)
        values = {**checkpoint["config"], **overrides, "out": str(resume), **(fixed or {})}
        config = from_dict(cls, values, source=f"{resume}/{CHECKPOINT_NAME}")
    elif config is None:
        config = cls(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not config.data:
        raise ValueError(no_data)
    if checkpoint is None and any((Path(config.out) / name).exists() for name in (CHECKPOINT_NAME, METRICS_NAME)):
        raise ValueError(f"{config.out} already holds a training run: continue it with --resume {config.out}, or pick another --out")
    return config, checkpoint


def begin_epoch(run: Any, epoch: int) -> None:
    """Fix epoch ``epoch``'s randomness from (seed, epoch): the main process's RNGs, the loader's
    shuffle and its workers' augmentation (workers are not persistent), a shard set's order. So an
    epoch draws the same randomness whether the run went straight through or was resumed."""
    seed = run.config.seed * 100_003 + epoch
    seed_everything(seed)
    run.train_loader.generator.manual_seed(seed)
    if hasattr(run.train_loader.dataset, "set_epoch"):  # shards: the shard order and shuffle buffer
        run.train_loader.dataset.set_epoch(epoch)


def restore_training_state(run: Any, checkpoint: dict[str, Any]) -> None:
    """Optimizer, schedule, grad scaler, epoch and RNG states of ``checkpoint`` into ``run`` (the
    weights are the caller's); metrics.jsonl rows logged after the checkpoint are dropped."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    apply_schedule(run.optimizer, run.scheduler)
    run.epoch = checkpoint["epoch"]
    set_rng_state(checkpoint["rng"])
    drop_rows_after(run.out / METRICS_NAME, run.epoch)


def write_metrics(out: Path, writer: Any, row: dict[str, Any]) -> None:
    """Append ``row`` to ``out/metrics.jsonl`` and, with a TensorBoard writer, its numbers as scalars."""
    with open(out / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()


def run_epoch(
    run: Any,
    epoch: int,
    batch_loss: Callable[[Any], tuple[torch.Tensor, int]],
    after_step: Callable[[int], None] | None = None,
    *,
    module: torch.nn.Module,
) -> dict[str, float]:
    """One pass of ``run.steps_per_epoch`` optimizer steps; returns mean loss, last peak lr and images/s.

    ``batch_loss(batch)`` gives (loss, images in the batch); gradients accumulate over
    ``accum_steps`` batches, are clipped to ``clip_grad`` (over ``module``'s parameters, in its
    order) if the config has one, and each
    optimizer step advances the schedule, then calls ``after_step(global step)``. ``run``
    provides config, device, precision's scaler, optimizer, scheduler, train_loader,
    steps_per_epoch, console and skip_log.
    """
    config = run.config
    clip_grad = getattr(config, "clip_grad", None)
    batches = run.steps_per_epoch * config.accum_steps
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=run.device)
    images = 0
    started = time.perf_counter()
    with epoch_progress(run.console, f"epoch {epoch}/{config.epochs}", run.steps_per_epoch) as (progress, task):
        loader = iter(run.train_loader)
        for index in range(batches):
            batch = next(loader, None)
            if batch is None:  # shards whose bad samples were skipped can end an epoch a batch early
                batches = index
                run.optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation is dropped, not carried over
                break
            loss, count = batch_loss(batch)
            run.scaler.scale(loss / config.accum_steps).backward()
            loss_sum += loss.detach()
            images += count
            if (index + 1) % config.accum_steps:
                continue
            if clip_grad is not None:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            step = (index + 1) // config.accum_steps
            if after_step is not None:
                after_step((epoch - 1) * run.steps_per_epoch + step)
            if step % 10 == 0 or step == run.steps_per_epoch:  # reading the loss waits for the device
                rate = images / (time.perf_counter() - started)
                progress.update(task, completed=step, loss=f"{loss_sum.item() / (index + 1):.4f}", lr=f"{peak_lr(run.optimizer):.3g}", rate=f"{rate:.0f}")
        del loader
    seconds = time.perf_counter() - started
    if batches == 0:
        raise ValueError(f"epoch {epoch} had no training batch: every training image was unreadable? See {run.skip_log.path}")
    loss = loss_sum.item() / batches
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss} in epoch {epoch}: lower the learning rate or use --precision fp32")
    return {"loss": loss, "lr": peak_lr(run.optimizer), "images_per_s": images / seconds}


def steps_per_epoch(dataset: Any, loader: torch.utils.data.DataLoader, config: Any) -> int:
    """Optimizer steps per epoch: the loader's full batches over ``accum_steps``, capped by ``steps_per_epoch``.

    A shard dataset counts the full batches every loader worker gets in every epoch of the run
    (each worker drops its own partial batch), so that no epoch ends short of the schedule.
    """
    batches, where = len(loader), ""
    if hasattr(dataset, "full_batches"):
        batches = dataset.full_batches(config.batch_size, loader.num_workers, range(1, config.epochs + 1))
        where = f" split over {max(1, loader.num_workers)} loader worker(s)"
    if batches < config.accum_steps:
        raise ValueError(
            f"{len(dataset)} training images{where} make {batches} full batch(es) of {config.batch_size}, "
            f"fewer than accum_steps={config.accum_steps}: lower --batch-size, --accum-steps or --workers"
        )
    steps = batches // config.accum_steps
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch is not None else steps


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


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group rate (with layer decay the head's; the other groups are scaled down)."""
    return max(group["lr"] for group in optimizer.param_groups)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it writable now, not after the first epoch."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"imgrec" * 1024)
        probe.unlink()
        for stale in out.glob(".*.tmp-*"):  # a checkpoint write cut short by a kill: never read, only space
            stale.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {out}: {exc.strerror or exc}. Pick another --out or fix its permissions.") from None
    return out


def open_tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install tensorboard
        return None
    return SummaryWriter(str(out / "tensorboard"))


__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "apply_schedule",
    "begin_epoch",
    "drop_rows_after",
    "epoch_progress",
    "open_tensorboard",
    "peak_lr",
    "prepare_output_dir",
    "restore_training_state",
    "run_epoch",
    "seed_everything",
    "start_or_resume",
    "steps_per_epoch",
    "write_metrics",
]
