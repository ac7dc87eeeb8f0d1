"""Test-time augmentation: several views of each input batch, whose logits are averaged.

``flip`` adds the mirror image (2 views); ``crops`` adds the four corner crops covering 87.5% of
the side, each resized back to the input size (5 views with the input itself); ``flip+crops``
both (10 views). The views are made from the model's input, after normalisation, on the device:
flips, crops and a bilinear resize commute with the per-channel normalisation, so no image is
decoded twice. Each view costs a forward pass: TTA multiplies inference time by the number of
views (BENCHMARKS.md measures what it buys), and it is off unless asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from imgrec.config import TTA_MODES

CROP_SHARE = 0.875  # the corner crops' side, as a share of the input's


def tta_views(batch: torch.Tensor, mode: str | None) -> list[torch.Tensor]:
    """The views of an NCHW batch that ``mode`` (``TTA_MODES``; None: the batch alone) averages over."""
    if mode is None:
        return [batch]
    known_mode(mode)
    views = [batch]
    if "crops" in mode:
        height, width = batch.shape[-2:]
        h, w = max(1, round(height * CROP_SHARE)), max(1, round(width * CROP_SHARE))
        for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
            crop = batch[..., top : top + h, left : left + w]
            views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False).contiguous(memory_format=_format(batch)))
    if "flip" in mode:
        views += [view.flip(-1) for view in views]
    return views


def _format(batch: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if batch.ndim == 4 and batch.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def known_mode(mode: str) -> None:
    """An error naming the modes where ``mode`` is none of ``TTA_MODES``."""
    if mode not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")


def averaged(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``forward``'s logits of ``batch``, averaged over the views of ``mode`` (in float32)."""
    if mode is None:
        return forward(batch)
    views = tta_views(batch, mode)
    return torch.stack([forward(view).float() for view in views]).mean(dim=0)


def check_tta(mode: str | None, run: str | os.PathLike | None) -> str | None:
    """``mode`` where it suits the run, else an error: a run trained without horizontal flips (left
    and right mean something in its images: digits, writing) would be shown mirror images it never
    saw. ``run``'s config.yaml says; a model directory without one is not checked."""
    if mode is None or mode == "none":
        return None
    known_mode(mode)
    config = Path(run, "config.yaml") if run is not None else None
    if "flip" in mode and config is not None and config.is_file():
        import yaml

        try:
            hflip = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data_config") or {}).get("hflip")
        except yaml.YAMLError:
            hflip = None
        if hflip == 0:
            raise ValueError(f"--tta {mode}: {run} was trained without horizontal flips (left and right mean something in its images), so mirrored views would mislead it; use --tta crops")
    return mode


__all__ = ["CROP_SHARE", "averaged", "check_tta", "tta_views"]
