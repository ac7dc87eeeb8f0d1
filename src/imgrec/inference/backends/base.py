"""What every inference backend says: how it runs the model, and where it needs a file, how that file is made."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from imgrec.card import ModelCard

Forward = Callable[[torch.Tensor], torch.Tensor]  # normalised float32 NCHW batch -> float32 logits on the CPU


class Backend:
    """One way of running a model directory's network."""

    name: ClassVar[str]
    file: ClassVar[str | None] = None  # the file in the model directory it runs from (ONNX), None for the PyTorch model itself
    devices: ClassVar[tuple[str, ...] | None] = None  # the device types it runs on; None: wherever PyTorch does
    precision: ClassVar[str | None] = None  # the precision it fixes, if any (the PyTorch backends)
    calibrates: ClassVar[bool] = False  # its export quantises, calibrated on images (int8)

    def load(self, model: torch.nn.Module, device: torch.device, *, precision: str = "auto", path: str | os.PathLike | None = None,
             threads: int | None = None) -> Forward:  # fmt: skip
        """The Forward of this backend; ``model`` is used (moved, re-laid out) as it is: pass a copy
        to keep yours. ``path`` is the file of a file-based backend."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path, *, calibration: torch.Tensor | None = None,
               fp32: Path | None = None) -> None:  # fmt: skip
        """Write the file this backend runs from (``card`` goes inside it). ``calibration`` holds
        normalised inputs for quantisation; ``fp32`` an fp32 ONNX export of the model already written."""
        raise ValueError(f"backend {self.name} runs the PyTorch model itself: there is no file to export")

    def check_device(self, device: torch.device) -> None:
        if self.devices is not None and device.type not in self.devices:
            where = " or ".join(self.devices)
            raise ValueError(f"backend {self.name} runs on {where} only, not {device}: use --device {self.devices[0]}, or another --backend on {device}")

    def require_file(self, path: str | os.PathLike | None, *, beside: tuple[str, ...] = (), made_by: str = "`imgrec export` or `imgrec benchmark`") -> Path:
        """``path`` as a Path where it (and its ``beside`` files: the same name with these
        suffixes) exists, else a FileNotFoundError naming what is missing and how it is made."""
        found = path is not None and Path(path).is_file() and all(Path(path).with_suffix(s).is_file() for s in beside)
        if not found:
            also = "".join(f" and the {s} beside it" for s in beside)
            raise FileNotFoundError(f"backend {self.name} needs {path or self.file}{also}: make {'them' if beside else 'it'} with {made_by}")
        return Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def metadata(card: ModelCard, **extra: Any) -> dict[str, Any]:
    """The card as an exported file carries it (inside the file and beside it as FILE.json)."""
    return {**card.to_dict(), **extra}


__all__ = ["Backend", "Forward", "metadata"]
