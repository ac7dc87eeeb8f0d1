"""``compile``: ``torch.compile`` of the channels_last model, in bf16 where the hardware has it."""

from __future__ import annotations

import os

import torch

from imgrec.hardware import resolve_precision
from imgrec.inference.backends.base import Backend, Forward
from imgrec.inference.backends.pytorch import torch_forward


class Compiled(Backend):
    name = "compile"

    def load(self, model: torch.nn.Module, device: torch.device, *, precision: str = "auto", path: str | os.PathLike | None = None,
             threads: int | None = None) -> Forward:  # fmt: skip
        return torch_forward(model, device, resolve_precision(precision, device), compiled=True)


__all__ = ["Compiled"]
