"""The learning-rate range test (Smith, 2015; fastai's ``lr_find``): ``--lr auto`` and ``imgrec lr-find``.

A few dozen optimizer steps on the run's own model, data and optimizer, the learning rate rising
exponentially from ``start`` to ``end``; the loss of each step, smoothed, against its rate. The
test stops once the loss has clearly diverged, then puts the weights, the optimizer's state and
the RNGs back as they were, so the run proper starts from the same point as without it. The
suggestion is a tenth of the rate at which the smoothed loss is lowest (fastai's ``lr_min``):
the loss still falls fast there, well short of where it turns up. The other common reading,
half-way down the curve's longest descent ("valley"), picked rates 2-8x below the recipe's on
four small datasets (BENCHMARKS.md, ``benchmarks/lr_suggestions.py``), rates that trained worse
there (``recipe_study.py``'s lr rows).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgrec import distributed
from imgrec.engine.checkpoint import rng_state, set_rng_state
from imgrec.utils import write_json

SMOOTHING = 0.9  # the loss curve's exponential moving average (0.98 lagged the curve by tens of steps)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest
BELOW_MINIMUM = 10.0  # the suggestion: the rate at the lowest smoothed loss over this


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed, one per step
    suggestion: float

    def to_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "losses": self.losses, "suggestion": self.suggestion}


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the rate at which the smoothed ``losses`` are lowest."""
    if len(losses) < 3:
        raise ValueError(f"the range test took {len(losses)} step(s): too few to read a curve from; give it more steps or data")
    lowest = min(range(len(losses)), key=losses.__getitem__)
    return lrs[lowest] / BELOW_MINIMUM


def range_test(trainer: Any, *, start: float = 1e-7, end: float = 10.0, steps: int = 100) -> RangeTest:
    """Run the range test on ``trainer``'s model, optimizer and training batches; its state is the
    same afterwards. Every rank sees the same curve (the losses are averaged over the ranks)."""
    task, optimizer = trainer.task, trainer.optimizer
    saved = (copy.deepcopy(task.module.state_dict()), copy.deepcopy(optimizer.state_dict()), rng_state())
    scales = [group["lr"] / max(g["lr"] for g in optimizer.param_groups) for group in optimizer.param_groups]
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, average, lowest = [], [], 0.0, float("inf")
    task.train_mode()
    batches = iter(trainer.train_loader)
    try:
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                batches = iter(trainer.train_loader)
                batch = next(batches)
            rate = start * factor**step
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = rate * scale
            loss, _ = task.loss(batch, trainer.forward)
            optimizer.zero_grad(set_to_none=True)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
            value = distributed.all_reduce(loss.detach().float().reshape(1).clone()).item() / distributed.world_size()
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(rate)
            losses.append(smoothed)
            lowest = min(lowest, smoothed)
            if not torch.isfinite(torch.tensor(smoothed)) or (step > 5 and smoothed > DIVERGED * lowest):
                break
    finally:
        del batches
        task.module.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        optimizer.zero_grad(set_to_none=True)
        set_rng_state(saved[2])
    finite = [(r, v) for r, v in zip(lrs, losses) if torch.isfinite(torch.tensor(v))]
    return RangeTest([r for r, _ in finite], [v for _, v in finite], suggest_lr([r for r, _ in finite], [v for _, v in finite]))


def write_range_test(test: RangeTest, folder: str | os.PathLike) -> Path:
    """FOLDER/lr_find.png (the curve, the suggestion marked) and lr_find.json; returns the PNG's path."""
    from imgrec.plots import lr_find_figure  # matplotlib: imported only to draw (0.4 s of every run's start)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "lr_find.json", test.to_dict())
    path = folder / "lr_find.png"
    lr_find_figure(test.lrs, test.losses, test.suggestion).savefig(path, format="png")
    return path


__all__ = ["RangeTest", "range_test", "suggest_lr", "write_range_test"]
