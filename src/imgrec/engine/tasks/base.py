"""The interface between the training loop and what it trains.

The ``Trainer`` (``imgrec.engine.trainer``) owns the loop: output folder, seeds, device and
precision, the training loader, optimizer and schedule, DDP, gradient accumulation, non-finite
steps, checkpoints and signals. A ``Task`` owns the rest, in a few methods: it builds its
modules and datasets, turns a batch into a loss, validates at an epoch's end, and saves what the
run produces. Supervised classification (``classify.py``) and self-supervised pretraining
(``pretrain.py``, with one file per method) are tasks; a new one (distillation, DINO) is one file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console

from imgrec.config import DataConfig, LoopConfig
from imgrec.data.folder import SkipLog
from imgrec.data.loader import create_loader

Forward = Callable[..., Any]  # the trained module as the trainer wraps it (DDP, torch.compile)


@dataclass
class RunContext:
    """What the trainer set up for a run before the task is built."""

    console: Console
    out: Path
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved for the device
    channels_last: bool
    skip_log: SkipLog  # unreadable files; the datasets record them here
    checkpoint: dict[str, Any] | None  # the checkpoint a resumed run continues from (restored after the build)


@dataclass
class OptimizerSettings:
    """The task's optimizer choices; ``None`` rates and decays take the optimizer's usual values."""

    opt: str
    base_lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    lars_trust: float = 1e-3
    clip_grad: float | None = None


class Task:
    """What a run trains. Subclasses set the attributes below in ``__init__`` and implement the methods."""

    config_class: ClassVar[type[LoopConfig]]
    no_data: ClassVar[str]  # the error when the config names no data

    config: LoopConfig  # the run's config, what the user left open filled in (``imgrec.recipe.resolve_recipe``)
    module: torch.nn.Module  # what the optimizer trains and DDP wraps, already on the run's device
    saved: torch.nn.Module  # what the run saves (the checkpoint's size check counts it)
    train_set: Any  # the dataset the trainer's loader reads
    data_config: DataConfig  # resolved; config.yaml records it
    batches_channels_last: bool = False  # stack training batches in NHWC memory in the loader's workers
    ema_in_checkpoint: bool = False  # the checkpoint holds a second copy of the module's weights (an EMA)

    @classmethod
    def check(cls, config: LoopConfig) -> None:
        """Refuse a config the task cannot run, before anything is written."""

    def make_train_loader(self, config: LoopConfig, device: torch.device, channels_last: bool) -> Any:
        """The loader of the training batches (``config`` is the task's, resolved): by default the
        files of ``train_set`` through loader processes, an ``EpochSampler``'s order."""
        return create_loader(
            self.train_set, batch_size=config.batch_size, train=True, num_workers=config.workers, seed=config.seed, persistent_workers=False,
            low_priority_workers=device.type == "cpu", channels_last=channels_last and self.batches_channels_last,
        )  # fmt: skip

    def optimizer_settings(self) -> OptimizerSettings:
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the modules in training mode for an epoch (a frozen backbone stays in eval mode)."""
        self.module.train()

    def loss(self, batch: Any, forward: Forward) -> tuple[torch.Tensor, int]:
        """(the loss of ``batch``, images in it); ``forward`` is the wrapped ``module``."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step that was taken (``step`` counts from 1 over the whole run)."""

    def validate(self, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's row of metrics.jsonl without ``epoch`` and ``seconds``: ``stats`` (mean loss,
        last lr, images/s of the training steps) as the task names them, and its validation."""
        raise NotImplementedError

    def save(self, row: dict[str, Any]) -> Callable[[], Any] | None:
        """Rank 0, after each epoch's row is logged: what the run produces so far, as a write made
        from copies (``checkpoint.snapshot``), which the trainer runs on its writer thread ahead of
        the checkpoint; None when there is nothing to write."""
        return None

    def finish(self) -> str | None:
        """Every rank, once the last epoch is saved and its checkpoint written: work on the finished
        model (calibration), and a line for the console, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The task's part of a checkpoint (the trainer adds optimizer, schedule, position, RNG)."""
        raise NotImplementedError

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        raise NotImplementedError

    def start_line(self, batch: str, lr: float) -> str:
        """The run's first console line; ``batch`` reads like "32x1" and ``lr`` is the peak rate."""
        raise NotImplementedError

    def epoch_line(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def end_line(self) -> str:
        raise NotImplementedError


__all__ = ["Forward", "OptimizerSettings", "RunContext", "Task"]
