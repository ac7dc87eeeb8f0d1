"""The PyTorch backends: the trained model itself at a fixed precision and memory layout.

``eager`` is fp32 with contiguous memory, the reference every other backend is judged against;
``channels_last`` is fp32 in NHWC memory (oneDNN's preferred layout on CPUs, cuDNN's on GPUs);
``bf16`` and ``fp16`` autocast to half precision with channels_last (fp16 on CUDA only).
"""

from __future__ import annotations

import copy
import os
from typing import ClassVar

import torch

from imgrec.hardware import autocast, resolve_precision
from imgrec.inference.backends.base import Backend, Forward


def torch_forward(model: torch.nn.Module, device: torch.device, precision: str, *, channels_last: bool = True, compiled: bool = False) -> Forward:
    """``model`` (moved to ``device`` and, if asked, to channels_last memory in place) as a Forward."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=memory_format)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is not None:  # on a copy: the caller's model stays float32 (explanations and search run it without autocast)
        model = copy.deepcopy(model)
        cast_weights(model, half)
    call = torch.compile(model) if compiled else model

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            return call(x).float().cpu()

    return forward


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The convolutions' and linear layers' parameters in ``dtype`` once, in place: autocast runs
    these layers in it anyway, and casting their weights again at every call allocated a new copy
    each time (a ten-minute bf16 server grew 12.9%). The other layers keep float32 parameters."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            module.to(dtype)


class PyTorchBackend(Backend):
    precision: ClassVar[str]
    channels_last: ClassVar[bool] = True

    def load(self, model: torch.nn.Module, device: torch.device, *, precision: str = "auto", path: str | os.PathLike | None = None,
             threads: int | None = None) -> Forward:  # fmt: skip
        self.check_device(device)
        return torch_forward(model, device, resolve_precision(self.precision, device), channels_last=self.channels_last)


class Eager(PyTorchBackend):
    name, precision, channels_last = "eager", "fp32", False


class ChannelsLast(PyTorchBackend):
    name, precision = "channels_last", "fp32"


class BFloat16(PyTorchBackend):
    name, precision = "bf16", "bf16"


class Float16(PyTorchBackend):
    name, precision, devices = "fp16", "fp16", ("cuda",)


__all__ = ["BFloat16", "ChannelsLast", "Eager", "Float16", "PyTorchBackend", "torch_forward"]
