"""The training loop, the same for every task: ``Trainer.fit`` -> ``epoch`` -> ``step``.

A task (``imgrec.engine.tasks``) builds what is trained and says what a batch's loss is, what
validation reports and what the run saves; the trainer owns the rest: the output folder, seeds,
device and precision, the loader, optimizer, schedule and gradient scaler, DDP, gradient
accumulation, steps whose loss is not finite, checkpoints and stop signals.

Exact resume: the data order and each image's augmentation depend only on (seed, epoch, image)
(``imgrec.data.sampler``, ``imgrec.data.folder.seeded_augmentation``), and ``RUN/last.pt`` holds
everything else (weights, optimizer, schedule, scaler, the task's state, the step within the
epoch, the epoch's running sums, every rank's RNG states). A checkpoint is written at the end of
every epoch, every ``checkpoint_every`` steps, every ``checkpoint_minutes`` minutes and on SIGTERM
or SIGINT, after which the run stops with ``TrainingInterrupted``; a run resumed from any of them,
mid-epoch included, continues as if it had never stopped. A failed write (disk full) keeps the
previous checkpoint and the run goes on. Under torchrun each process trains on its share of every
epoch in DDP (``imgrec.distributed``); rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from imgrec import distributed
from imgrec.card import CHECKPOINT_NAME
from imgrec.config import LoopConfig, from_dict, save_yaml, to_dict
from imgrec.data.folder import SkipLog
from imgrec.data.sampler import EpochSampler
from imgrec.engine.checkpoint import BackgroundWriter, load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from imgrec.engine.lr_find import RangeTest, range_test, write_range_test
from imgrec.engine.optim import apply_schedule, cosine_schedule, create_optimizer, peak_lr, scaled_lr
from imgrec.engine.progress import epoch_progress, ranks_note
from imgrec.engine.run_dir import (
    CONFIG_NAME,
    METRICS_NAME,
    SKIP_LOG_NAME,
    check_free_space,
    drop_rows_after,
    merge_skip_logs,
    open_tensorboard,
    prepare_output_dir,
    write_metrics,
)
from imgrec.engine.tasks.base import RunContext, Task
from imgrec.hardware import flush_denormals, make_deterministic, resolve_device, resolve_precision

C = TypeVar("C", bound=LoopConfig)


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


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint records besides the weights and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done in the current epoch (a mid-epoch checkpoint's position)
    partial: dict[str, float] = field(default_factory=dict)  # that epoch's running sums (EpochSums.saved)
    bad_steps: int = 0  # steps in a row whose loss was not finite
    skipped_steps: int = 0  # such steps over the whole run
    skipped_files: int = 0  # unreadable files met so far, over every rank (rank 0 counts them)
    resume_rng: dict[str, Any] | None = None  # a mid-epoch checkpoint's RNG state, for its epoch's start
    last_save: float = field(default_factory=time.monotonic)


@dataclass
class EpochSums:
    """The running sums of one epoch's steps on this rank; a mid-epoch checkpoint keeps them."""

    loss_sum: torch.Tensor  # of the steps taken, on the device (read only when shown)
    batches: int = 0  # micro-batches of the steps taken
    images: int = 0  # every image read, skipped steps included
    seconds_before: float = 0.0  # spent before a resume
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resume(cls, partial: dict[str, float], device: torch.device) -> EpochSums:
        loss = torch.tensor(partial.get("loss_sum", 0.0), device=device)
        return cls(loss, int(partial.get("batches", 0)), int(partial.get("images", 0)), partial.get("seconds", 0.0))

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def saved(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum.item(), "batches": self.batches, "images": self.images, "seconds": self.seconds()}


class Trainer:
    """One run of a task: built once (``__init__``), restored from a checkpoint if resumed, then ``fit``."""

    def __init__(self, task_class: type[Task], config: LoopConfig, console: Console, device: torch.device | None = None, checkpoint: dict | None = None):
        self.console = console
        self.out = prepare_output_dir(config.out)
        seed_everything(config.seed)
        if config.deterministic:
            make_deterministic()
        self.device = device if device is not None else resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        flush_denormals(self.device)
        channels_last = config.channels_last if config.channels_last is not None else True
        self.skip_log = SkipLog(self.out / SKIP_LOG_NAME if distributed.is_main() else None)  # other ranks' are merged at each epoch's end
        self.state, self.signals, self.saver = LoopState(), StopSignals(), BackgroundWriter()
        self.task = task = task_class(config, RunContext(console, self.out, self.device, self.precision, channels_last, self.skip_log, checkpoint))
        config = task.config  # what was left open now chosen
        self.forward = distributed.wrap(task.module, self.device, sync_bn=config.sync_bn)
        self.forward = torch.compile(self.forward) if config.compile else self.forward
        self.train_loader = task.make_train_loader(config, self.device, channels_last)
        # Shards under DDP: one rank's split may run dry first, and every rank must stop at the same step.
        self.must_agree_on_end = distributed.world_size() > 1 and not isinstance(self.train_loader.sampler, EpochSampler)
        self.steps_per_epoch = steps_per_epoch(task.train_set, self.train_loader, config)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.build_optimizer(config)
        self.range_test = self.find_lr(config) if config.lr == "auto" and checkpoint is None else None
        # config.yaml records what the run used, not just what was asked for.
        self.config = dataclasses.replace(
            config, data_config=to_dict(task.data_config), opt=self.settings.opt, base_lr=self.settings.base_lr, lr=self.lr,
            weight_decay=self.optimizer.param_groups[0]["weight_decay"], precision=self.precision, channels_last=channels_last,
            workers=self.train_loader.num_workers,
        )  # fmt: skip
        self.writer = None
        if distributed.is_main():
            check_free_space(self.out, task.module, self.settings.opt, saved=task.saved, ema=task.ema_in_checkpoint)
            self.writer = open_tensorboard(self.out) if config.tensorboard else None
            save_yaml(self.config, self.out / CONFIG_NAME)

    def build_optimizer(self, config: LoopConfig, lr: float | None = None) -> None:
        """The optimizer the task asks for at ``lr`` (default: the config's, or the rate scaled to
        the global batch), its cosine schedule, the grad scaler."""
        self.settings = settings = self.task.optimizer_settings()
        global_batch = config.batch_size * config.accum_steps * distributed.world_size()
        fixed = config.lr if isinstance(config.lr, float | int) else None
        self.lr = lr if lr is not None else fixed if fixed is not None else scaled_lr(settings.opt, global_batch, settings.base_lr)
        self.optimizer = create_optimizer(
            self.task.module, settings.opt, self.lr, settings.weight_decay, config.momentum, settings.layer_decay, lars_trust=settings.lars_trust
        )
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, round(config.warmup_epochs * self.steps_per_epoch), config.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def find_lr(self, config: LoopConfig) -> RangeTest:
        """``--lr auto``: a learning-rate range test picks the rate (its curve in RUN/lr_find.png and .json)."""
        test = range_test(self)
        self.build_optimizer(config, lr=test.suggestion)
        if distributed.is_main():
            path = write_range_test(test, self.out)
            self.console.print(f"lr auto: {test.suggestion:.3g} from a range test of {len(test.lrs)} steps ({path})", highlight=False)
        return test

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train the epochs not done yet; returns the run directory."""
        config = self.config
        self.console.print(self.task.start_line(f"{config.batch_size}x{config.accum_steps}{ranks_note()}", self.lr), highlight=False)
        with self.signals:
            try:
                while self.state.epoch < config.epochs:
                    self.epoch(self.state.epoch + 1)
            finally:
                self.finish_checkpoint()  # whatever ends the run, the checkpoint being written is finished
        if self.writer is not None:
            self.writer.close()
        line = self.task.finish()
        if line:
            self.console.print(line, highlight=False)
        if self.state.skipped_files:
            self.console.print(f"{self.state.skipped_files} unreadable file(s) were skipped; see {self.skip_log.path}", style="yellow", highlight=False)
        self.console.print(self.task.end_line(), highlight=False)
        return self.out

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Epoch ``epoch`` (from 1): its optimizer steps from ``state.step`` on, the task's validation
        and save, a row in metrics.jsonl (returned; its images/s times the steps alone), a
        checkpoint, and the stop a signal asked for during it."""
        self.begin_epoch(epoch)
        started = time.perf_counter()
        self.task.train_mode()
        sums = EpochSums.resume(self.state.partial, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with epoch_progress(self.console, f"epoch {epoch}/{self.config.epochs}", self.steps_per_epoch) as (progress, bar):
            progress.update(bar, completed=self.state.step)
            batches = iter(self.train_loader)
            for step in range(self.state.step + 1, self.steps_per_epoch + 1):
                if not self.step(epoch, step, batches, sums):
                    break  # shards whose bad samples were skipped can end an epoch a batch early
                if step % 10 == 0 or step == self.steps_per_epoch:  # reading the loss waits for the device
                    mean = f"{sums.loss_sum.item() / sums.batches:.4f}" if sums.batches else "-"
                    progress.update(bar, completed=step, loss=mean, lr=f"{peak_lr(self.optimizer):.3g}", rate=f"{sums.images / sums.seconds():.0f}")
            del batches  # the loader's workers end here, before validation starts its own
        row = {"epoch": epoch, **self.task.validate(epoch, self.epoch_stats(epoch, sums))}
        row["seconds"] = round(time.perf_counter() - started, 3)
        if self.state.skipped_steps:
            row["skipped_steps"] = self.state.skipped_steps
        self.state.epoch, self.state.step = epoch, 0
        outputs = None
        if distributed.is_main():
            write_metrics(self.out, self.writer, row)
            self.console.print(self.task.epoch_line(row), highlight=False)
            outputs = self.task.save(row)  # written with the checkpoint, ahead of it
        self.save_checkpoint(before=outputs)
        self.state.skipped_files = merge_skip_logs(self.skip_log) or self.state.skipped_files  # workers are gone between epochs
        if distributed.any_rank(self.signals.requested is not None, self.device) and epoch < self.config.epochs:
            raise TrainingInterrupted(self.signals.requested or signal.SIGTERM, self.out, epoch, 0)
        return row

    def step(self, epoch: int, step: int, batches: Iterator[Any], sums: EpochSums) -> bool:
        """Optimizer step ``step`` of epoch ``epoch``: ``accum_steps`` batches forward and backward
        (DDP syncs only on the last), the gradients clipped if the task asks, the update, the schedule.

        Between steps the ranks agree (one small all-reduce) on three things: a loss that is not
        finite on any rank skips the step (counted; ``max_bad_steps`` in a row stop the run, the
        last checkpoint untouched); a checkpoint is due; a stop signal arrived (checkpoint, then
        ``TrainingInterrupted``). Returns False when the data ran out before the step was whole.
        """
        accum = self.config.accum_steps
        step_loss, finite = torch.zeros((), device=self.device), torch.ones((), dtype=torch.bool, device=self.device)
        for micro in range(accum):
            batch = self.next_batch(batches)
            if batch is None:
                self.optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation is dropped, not carried over
                return False
            with contextlib.nullcontext() if micro == accum - 1 else getattr(self.forward, "no_sync", contextlib.nullcontext)():
                loss, count = self.task.loss(batch, self.forward)
                self.scaler.scale(loss / accum).backward()
            step_loss += loss.detach()
            finite &= torch.isfinite(loss.detach())
            sums.images += count
        bad, stop, save = step_flags(~finite, self.signals.requested is not None, self.checkpoint_due(epoch, step))
        if bad:
            self.skip_step(epoch, step)
        else:
            self.state.bad_steps = 0
            self.apply_gradients()
            sums.loss_sum += step_loss
            sums.batches += accum
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still spends its batches: the schedule follows the data
        if not bad:
            self.task.after_step((epoch - 1) * self.steps_per_epoch + step, self.total_steps)
        self.state.step = step
        if stop or (save and step < self.steps_per_epoch):  # the epoch's end saves anyway
            self.state.partial = sums.saved()
            self.save_checkpoint()
        if stop:
            raise TrainingInterrupted(self.signals.requested or signal.SIGTERM, self.out, self.state.epoch, step)
        return True

    # -- the pieces of a step and an epoch ----------------------------------------------------------
    def next_batch(self, batches: Iterator[Any]) -> Any:
        """The loader's next batch, or None when it (on any rank, for shards under DDP) has run out."""
        batch = next(batches, None)
        if self.must_agree_on_end and distributed.any_rank(batch is None, self.device):
            return None
        return batch

    def checkpoint_due(self, epoch: int, step: int) -> bool:
        config = self.config
        due = bool(config.checkpoint_every and ((epoch - 1) * self.steps_per_epoch + step) % config.checkpoint_every == 0)
        return due or bool(config.checkpoint_minutes and time.monotonic() - self.state.last_save > 60 * config.checkpoint_minutes)

    def skip_step(self, epoch: int, step: int) -> None:
        """Count a step whose loss was not finite on some rank; too many in a row end the run."""
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        self.console.print(
            f"step {step} of epoch {epoch}: the loss is not finite on some rank; step skipped ({self.state.bad_steps} in a row)", style="yellow", highlight=False
        )
        if self.state.bad_steps >= self.config.max_bad_steps:
            raise FloatingPointError(
                f"{self.state.bad_steps} steps in a row had a loss that is not finite (epoch {epoch}, step {step}): stopping. "
                f"The last good checkpoint is {self.out / CHECKPOINT_NAME}; lower the learning rate, clip gradients (--clip-grad) "
                f"or use --precision fp32, then --resume it"
            )

    def apply_gradients(self) -> None:
        self.finish_checkpoint()  # a checkpoint written during this step is on disk before the step's update
        if self.settings.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.module.parameters(), self.settings.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def epoch_stats(self, epoch: int, sums: EpochSums) -> dict[str, float]:
        """Mean loss, last peak lr and images/s of the epoch's steps, over every rank."""
        totals = distributed.all_reduce(torch.tensor([sums.loss_sum.item(), float(sums.batches), float(sums.images)], dtype=torch.float64, device=self.device))
        loss_total, done_total, images_total = totals.tolist()
        self.state.partial = {}
        if done_total == 0:
            raise ValueError(f"epoch {epoch} had no training batch with a finite loss: every training image unreadable? See {self.skip_log.path}")
        return {"loss": loss_total / done_total, "lr": peak_lr(self.optimizer), "images_per_s": images_total / sums.seconds()}

    def begin_epoch(self, epoch: int) -> None:
        """Fix epoch ``epoch``'s randomness from (seed, epoch, rank): the process's RNGs, the folder
        sampler's permutation, each image's augmentation, a shard set's order. So an epoch draws the
        same randomness whether the run went straight through or was resumed.

        A run resumed in the middle of the epoch (``state.step`` steps done) skips the batches it
        read before and takes the RNG state its checkpoint saved.
        """
        seed = self.config.seed * 100_003 + epoch + 1_000_000_007 * distributed.rank()
        seed_everything(seed)
        loader = self.train_loader
        loader.generator.manual_seed(seed)
        for part in (loader.sampler, loader.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        if self.state.step:
            batches = self.state.step * self.config.accum_steps
            if isinstance(loader.sampler, EpochSampler):
                loader.sampler.skip(batches * loader.batch_size)
            else:
                loader.dataset.skip(batches, loader.batch_size)
            set_rng_state(self.state.resume_rng)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, before: Callable[[], Any] | None = None) -> None:
        """Write ``RUN/last.pt``: the task's state plus the loop's (optimizer, schedule, scaler,
        position, running sums, every rank's RNG state, config).

        Called by every rank (the RNG states are gathered); rank 0 writes, on a thread
        (``BackgroundWriter``: the state is copied first, and the write is finished before the
        next optimizer update, or before the run stops), after ``before`` (the task's model files of
        the epoch, ``Task.save``). A write that fails (disk full, a vanished mount) is reported and
        the previous checkpoint kept.
        """
        ranks = distributed.gather_objects({"rng": rng_state(), "partial": dict(self.state.partial)})
        self.state.last_save = time.monotonic()
        if not distributed.is_main():
            return
        state = {
            **self.task.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "bad_steps": self.state.bad_steps,
            "rng": ranks[0]["rng"],
            "ranks": ranks,  # every rank's RNG states and its sums of the epoch so far
            "world_size": distributed.world_size(),
            "config": to_dict(self.config),
        }
        self.warn_unsaved(self.saver.write(self.out / CHECKPOINT_NAME, state, save_checkpoint, before))

    def finish_checkpoint(self) -> None:
        """Wait for the checkpoint being written, if any (a failed write is reported, the previous one kept)."""
        self.warn_unsaved(self.saver.wait())

    def warn_unsaved(self, failure: OSError | None) -> None:
        if failure is not None:
            self.console.print(
                f"warning: could not write {failure.filename or self.out / CHECKPOINT_NAME} ({failure.strerror or failure}); "
                f"the previous one is kept and training goes on. Free some space in {self.out}.",
                style="yellow",
                highlight=False,
            )

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """The task's state, optimizer, schedule, scaler, position and RNG states of ``checkpoint``;
        metrics.jsonl rows logged after it are dropped, and the console says where the run goes on.

        A checkpoint written in the middle of an epoch continues at its step with this rank's RNG
        state (applied by ``begin_epoch``); it needs the number of processes that wrote it, since
        the ranks' shares of the epoch depend on it.
        """
        self.task.load_state_dict(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        apply_schedule(self.optimizer, self.scheduler)
        state = self.state
        state.epoch, state.step = checkpoint["epoch"], checkpoint.get("step", 0)
        state.skipped_steps, state.bad_steps = checkpoint.get("skipped_steps", 0), checkpoint.get("bad_steps", 0)
        world, saved_world = distributed.world_size(), checkpoint.get("world_size", 1)
        if state.step and world != saved_world:
            raise ValueError(
                f"{self.out / CHECKPOINT_NAME} was written by {saved_world} process(es) in the middle of epoch {state.epoch + 1}, "
                f"and this run has {world}: resume it with {saved_world} (torchrun --nproc_per_node ...), as each one's share of the epoch depends on it"
            )
        ranks = checkpoint.get("ranks") or [{"rng": checkpoint["rng"], "partial": {}}]
        own = ranks[distributed.rank()] if len(ranks) == world else ranks[0]
        set_rng_state(own["rng"])
        state.resume_rng = own["rng"] if state.step else None
        state.partial = dict(own["partial"]) if state.step else {}
        drop_rows_after(self.out / METRICS_NAME, state.epoch)
        within = f", step {state.step} of epoch {state.epoch + 1}" if state.step else ""
        self.console.print(f"resumed {self.out} after epoch {state.epoch} of {self.config.epochs}{within}", highlight=False)


def step_flags(bad: torch.Tensor, stop: bool, save: bool) -> tuple[bool, bool, bool]:
    """(any rank's loss not finite, any rank asked to stop, any rank due a checkpoint): one small
    all-reduce, so that every rank skips, stops and saves at the same step."""
    flags = torch.stack([bad.float().reshape(()), torch.tensor(float(stop), device=bad.device), torch.tensor(float(save), device=bad.device)])
    bad_any, stop_any, save_any = (v > 0 for v in distributed.all_reduce(flags, op="max").tolist())
    return bad_any, stop_any, save_any


def steps_per_epoch(dataset: Any, loader: torch.utils.data.DataLoader, config: LoopConfig) -> int:
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


def start_or_resume(
    task_class: type[Task], config: C | None, resume: str | os.PathLike | None, overrides: dict[str, Any]
) -> tuple[C, dict[str, Any] | None]:
    """(config, checkpoint or None) for a new run, or for ``resume=RUN`` continuing RUN's own config.

    On resume, ``overrides`` (epochs, device, workers...) go over the checkpoint's config.
    ``resume="auto"`` continues the run in ``config.out`` when it has a checkpoint and starts
    ``config`` there otherwise: the same command line serves the first start and every restart
    (torchrun --max-restarts). A new run must have data and an ``out`` that holds no run yet.
    """
    cls = task_class.config_class
    if resume == "auto":
        start = config if config is not None else cls(**overrides)
        if not (Path(start.out) / CHECKPOINT_NAME).exists():
            # Killed before its first checkpoint: nothing to continue, so start over (rows it logged go).
            (Path(start.out) / METRICS_NAME).unlink(missing_ok=True)
            return start_or_resume(task_class, start, None, {} if config is None else overrides)
        resume, config = start.out, None
    checkpoint = None
    if resume is not None:
        if config is not None:
            raise ValueError("pass either a config or resume=RUN (which continues with the run's own config), not both")
        checkpoint = load_checkpoint(Path(resume) / CHECKPOINT_NAME)
        config = from_dict(cls, {**checkpoint["config"], **overrides, "out": str(resume)}, source=f"{resume}/{CHECKPOINT_NAME}")
    elif config is None:
        config = cls(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not config.data:
        raise ValueError(task_class.no_data)
    task_class.check(config)
    if checkpoint is None and any((Path(config.out) / name).exists() for name in (CHECKPOINT_NAME, METRICS_NAME)):
        raise ValueError(
            f"{config.out} already holds a training run: continue it with --resume {config.out} (or --resume auto), or pick another --out"
        )
    return config, checkpoint


def run_task(
    task_class: type[Task], config: LoopConfig | None, *, resume: str | os.PathLike | None = None, console: Console | None = None, overrides: dict[str, Any]
) -> Path:
    """Start (``config`` and/or ``overrides``), resume (``resume=RUN``) or start-or-resume
    (``resume="auto"``) a run of ``task_class`` in torchrun's process group, if any; returns its
    directory. Only rank 0's console speaks."""
    console = console or Console(soft_wrap=True)
    config, checkpoint = start_or_resume(task_class, config, resume, overrides)
    with distributed.process_group(config.device) as device:
        trainer = Trainer(task_class, config, console if distributed.is_main() else Console(quiet=True), device, checkpoint)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        return trainer.fit()


__all__ = ["EpochSums", "LoopState", "StopSignals", "Trainer", "TrainingInterrupted", "run_task", "start_or_resume", "step_flags", "steps_per_epoch"]
