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
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from imgrec.checkpoint import CHECKPOINT_NAME, METRICS_NAME, SKIP_LOG_NAME, load_checkpoint, set_rng_state
from imgrec.config import from_dict
from imgrec.data.folder import SkipLog
from imgrec.data.sampler import EpochSampler
from imgrec.engine import distributed
from imgrec.engine.hardware import flush_denormals, make_deterministic, resolve_device, resolve_precision
from imgrec.engine.resume import TrainingInterrupted, init_loop_state, step_flags

CONFIG_NAME = "config.yaml"

C = TypeVar("C")


def start_or_resume(
    cls: type[C], config: C | None, resume: str | os.PathLike | None, overrides: dict[str, Any], *, no_data: str, fixed: dict[str, Any] | None = None
) -> tuple[C, dict[str, Any] | None]:
    """(config, checkpoint or None) for a new run, or for ``resume=RUN`` continuing RUN's own config.

    On resume, ``overrides`` (epochs, device, workers...) and ``fixed`` go over the checkpoint's
    config. ``resume="auto"`` continues the run in ``config.out`` when it has a checkpoint and
    starts ``config`` there otherwise: the same command line serves the first start and every
    restart (torchrun --max-restarts). A new run must have data (``no_data`` is the message
    otherwise) and an ``out`` that holds no run yet.
    """
    if resume == "auto":
        start = config if config is not None else cls(**overrides)
        if not (Path(start.out) / CHECKPOINT_NAME).exists():
            # Killed before its first checkpoint: nothing to continue, so start over (rows it logged go).
            (Path(start.out) / METRICS_NAME).unlink(missing_ok=True)
            return start_or_resume(cls, start, None, {} if config is None else overrides, no_data=no_data, fixed=fixed)
        resume, config = start.out, None
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
        raise ValueError(
            f"{config.out} already holds a training run: continue it with --resume {config.out} (or --resume auto), or pick another --out"
        )
    return config, checkpoint


def launch(build: Callable[[Console, torch.device], Any], device: str, console: Console, checkpoint: dict[str, Any] | None) -> Path:
    """Build a run with ``build(console, device)`` in torchrun's process group (if any), restore
    ``checkpoint`` into it, train it; returns its directory. Only rank 0's console speaks."""
    with distributed.process_group(device) as resolved:
        run = build(console if distributed.is_main() else Console(quiet=True), resolved)
        if checkpoint is not None:
            run.restore(checkpoint)
        return run.fit()


def open_run(run: Any, config: Any, console: Console, device: torch.device | None) -> bool:
    """What every run sets up first: its console, its output folder (proved writable), seeds,
    deterministic algorithms if asked, device, precision, the skipped-files log (rank 0's in the
    run folder; other ranks keep theirs, merged at each epoch's end), the loop's bookkeeping
    (``init_loop_state``). Returns channels_last."""
    run.console = console
    run.out = prepare_output_dir(config.out)
    seed_everything(config.seed)
    if config.deterministic:
        make_deterministic()
    run.device = device if device is not None else resolve_device(config.device)
    run.precision = resolve_precision(config.precision, run.device)
    flush_denormals(run.device)
    run.skip_log = SkipLog(run.out / SKIP_LOG_NAME if distributed.is_main() else None)
    init_loop_state(run)
    return config.channels_last if config.channels_last is not None else True


def begin_epoch(run: Any, epoch: int) -> None:
    """Fix epoch ``epoch``'s randomness from (seed, epoch, rank): the process's RNGs, the folder
    sampler's permutation, each image's augmentation, a shard set's order. So an epoch draws the
    same randomness whether the run went straight through or was resumed.

    A run resumed in the middle of the epoch (``run.step`` steps done) skips the batches it read
    before and takes the RNG state its checkpoint saved (``run.resume_rng``).
    """
    seed = run.config.seed * 100_003 + epoch + 1_000_000_007 * distributed.rank()
    seed_everything(seed)
    loader = run.train_loader
    loader.generator.manual_seed(seed)
    for part in (loader.sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    if run.step:
        batches = run.step * run.config.accum_steps
        if isinstance(loader.sampler, EpochSampler):
            loader.sampler.skip(batches * loader.batch_size)
        else:
            loader.dataset.skip(batches, loader.batch_size)
        set_rng_state(run.resume_rng)


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
    """The optimizer steps of epoch ``epoch`` from ``run.step`` on; returns mean loss, last peak lr
    and images/s (over every rank).

    ``batch_loss(batch)`` gives (loss, images in the batch); gradients accumulate over
    ``accum_steps`` batches (DDP syncs only on the last), are clipped to ``clip_grad`` (over
    ``module``'s parameters, in its order) if the config has one, and each optimizer step
    advances the schedule, then calls ``after_step(global step)``.

    Between steps the ranks agree (one small all-reduce) on three things: a loss that is not
    finite on any rank skips the step (counted; ``max_bad_steps`` in a row stop the run, the last
    checkpoint untouched); a checkpoint is due (``checkpoint_every`` steps or
    ``checkpoint_minutes``); a stop signal arrived (checkpoint, then ``TrainingInterrupted``).
    ``run`` provides config, device, scaler, optimizer, scheduler, train_loader, forward,
    steps_per_epoch, console, signals, step, partial (the epoch's sums so far) and save_checkpoint.
    """
    config = run.config
    clip_grad = getattr(config, "clip_grad", None)
    accum = config.accum_steps
    batches = run.steps_per_epoch * accum
    partial = run.partial or {}
    loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=run.device)
    done, images, seconds_before = partial.get("batches", 0), partial.get("images", 0), partial.get("seconds", 0.0)
    step_loss, finite = torch.zeros((), device=run.device), torch.ones((), dtype=torch.bool, device=run.device)
    must_agree_on_end = distributed.world_size() > 1 and not isinstance(getattr(run.train_loader, "sampler", None), EpochSampler)
    no_sync = getattr(run.forward, "no_sync", contextlib.nullcontext)
    run.optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()

    def remember() -> None:  # the epoch's sums so far, for a mid-epoch checkpoint
        run.partial = {"loss_sum": loss_sum.item(), "batches": done, "images": images, "seconds": seconds_before + time.perf_counter() - started}

    with epoch_progress(run.console, f"epoch {epoch}/{config.epochs}", run.steps_per_epoch) as (progress, task):
        progress.update(task, completed=run.step)
        loader = iter(run.train_loader)
        for index in range(run.step * accum, batches):
            batch = next(loader, None)
            ended = batch is None
            if must_agree_on_end:  # shards: one rank's split may run dry first; all stop together
                ended = distributed.any_rank(ended, run.device)
            if ended:  # shards whose bad samples were skipped can end an epoch a batch early
                batches = index
                run.optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation is dropped, not carried over
                break
            last = (index + 1) % accum == 0
            with contextlib.nullcontext() if last else no_sync():
                loss, count = batch_loss(batch)
                run.scaler.scale(loss / accum).backward()
            step_loss += loss.detach()
            finite &= torch.isfinite(loss.detach())
            images += count
            if not last:
                continue
            step = (index + 1) // accum
            due = bool(config.checkpoint_every and ((epoch - 1) * run.steps_per_epoch + step) % config.checkpoint_every == 0)
            due = due or bool(config.checkpoint_minutes and time.monotonic() - run.last_save > 60 * config.checkpoint_minutes)
            bad, stop, save = step_flags(~finite, run.signals.requested is not None, due)
            if bad:
                run.bad_steps += 1
                run.skipped_steps += 1
                run.console.print(f"step {step} of epoch {epoch}: the loss is not finite on some rank; step skipped ({run.bad_steps} in a row)", style="yellow", highlight=False)
                if run.bad_steps >= config.max_bad_steps:
                    raise FloatingPointError(
                        f"{run.bad_steps} steps in a row had a loss that is not finite (epoch {epoch}, step {step}): stopping. "
                        f"The last good checkpoint is {run.out / CHECKPOINT_NAME}; lower the learning rate, clip gradients (--clip-grad) "
                        f"or use --precision fp32, then --resume it"
                    )
            else:
                run.bad_steps = 0
                if clip_grad is not None:
                    run.scaler.unscale_(run.optimizer)
                    torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
                run.scaler.step(run.optimizer)
                run.scaler.update()
                loss_sum += step_loss
                done += accum
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()  # a skipped step still spends its batches: the schedule follows the data
            step_loss.zero_()
            finite.fill_(True)
            if after_step is not None and not bad:
                after_step((epoch - 1) * run.steps_per_epoch + step)
            run.step = step
            if step % 10 == 0 or step == run.steps_per_epoch:  # reading the loss waits for the device
                rate = images / (seconds_before + time.perf_counter() - started)
                mean = f"{loss_sum.item() / done:.4f}" if done else "-"
                progress.update(task, completed=step, loss=mean, lr=f"{peak_lr(run.optimizer):.3g}", rate=f"{rate:.0f}")
            if stop or (save and step < run.steps_per_epoch):  # the epoch's end saves anyway
                remember()
                run.save_checkpoint()
            if stop:
                raise TrainingInterrupted(run.signals.requested or signal.SIGTERM, run.out, run.epoch, step)
        del loader
    totals = distributed.all_reduce(torch.tensor([loss_sum.item(), float(done), float(images)], dtype=torch.float64, device=run.device))
    loss_total, done_total, images_total = totals.tolist()
    seconds = seconds_before + time.perf_counter() - started
    run.partial = {}
    if batches == 0 or done_total == 0:
        raise ValueError(f"epoch {epoch} had no training batch with a finite loss: every training image unreadable? See {run.skip_log.path}")
    return {"loss": loss_total / done_total, "lr": peak_lr(run.optimizer), "images_per_s": images_total / seconds}


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


def ranks_note() -> str:
    """The words "per rank on N ranks" for the batch in a run's first line under torch.distributed."""
    world = distributed.world_size()
    return f" per rank on {world} ranks" if world > 1 else ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def open_tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install tensorboard
        return None
    return SummaryWriter(str(out / "tensorboard"))


__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "begin_epoch",
    "epoch_progress",
    "launch",
    "open_run",
    "open_tensorboard",
    "peak_lr",
    "prepare_output_dir",
    "run_epoch",
    "seed_everything",
    "start_or_resume",
    "steps_per_epoch",
    "write_metrics",
]
