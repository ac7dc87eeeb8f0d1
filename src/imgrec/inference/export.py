"""``imgrec export RUN``: the model directory as ONNX, OpenVINO or TorchScript, checked against the eager model.

The exported model takes what the eager model takes: float32 images [batch, 3, H, W], resized,
cropped and normalised as the model card says, with a dynamic batch axis. The card (architecture,
classes, class names, preprocessing) travels with it: inside the file (ONNX metadata ``imgrec``,
TorchScript extra file ``imgrec.json``) and beside it as ``FILE.json``, so a server needs nothing else.

After writing, the export is run on real images (a folder you name, or the run's own val split)
next to the eager model: the largest |logit difference| and the top-1 agreement are printed, and
the export fails past a tolerance. ``openvino`` writes an OpenVINO IR (model.openvino.xml and
.bin). ``int8`` quantises after training: ONNX with onnxruntime (the ``onnx-int8`` backend:
static, QDQ, per-channel int8 weights and uint8 activations), OpenVINO with NNCF, accuracy
controlled (``openvino-int8``), both calibrated on a few hundred images, and reports the top-1
agreement with the eager fp32 model. The files are what the backends of the same names run
(``imgrec.inference.backends``).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from imgrec.card import ModelCard
from imgrec.data.decode import BadImageError, load_sample
from imgrec.data.folder import iter_image_files
from imgrec.data.splits import SPLIT_FILE, SplitRecord
from imgrec.data.transforms import BatchNormalize, eval_transform
from imgrec.inference.backends import backend_class, get_backend
from imgrec.inference.backends.base import metadata
from imgrec.inference.backends.onnx import read_onnx_metadata
from imgrec.models.directory import load_model_dir
from imgrec.progress import activity, track
from imgrec.utils import write_json

FORMATS = ("onnx", "openvino", "torchscript")
# the backend that runs each file-based export, by (format, int8); it writes the file
EXPORT_BACKENDS = {("onnx", False): "onnx", ("onnx", True): "onnx-int8", ("openvino", False): "openvino", ("openvino", True): "openvino-int8"}


@dataclass
class ExportReport:
    path: Path
    format: str
    images: int  # real images the parity check ran on
    max_abs_diff: float  # largest |logit difference| against the eager fp32 model
    top1_agreement: float  # percent of images with the same top-1 class
    int8: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def export(
    run: str | os.PathLike,
    format: str = "onnx",
    *,
    out: str | os.PathLike | None = None,
    int8: bool = False,
    images: str | os.PathLike | None = None,
    max_images: int = 256,
    calibration_images: int = 300,
    tolerance: float | None = None,
    min_agreement: float | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> ExportReport:
    """Export the model directory ``run``; returns what the parity check measured.

    ``images``: a folder of images for the parity check and int8 calibration (default: the val
    split of the data the run trained on). ``tolerance``: the largest |logit difference| allowed
    (default 1e-3 for fp32 exports; int8 is judged by agreement alone). ``min_agreement``: the
    lowest top-1 agreement in percent (default 100 for fp32, 97 for int8). A failed check raises
    ``ValueError`` naming both figures; the file stays on disk for inspection. Reading the
    images, the int8 calibration and the check show progress on ``console`` where it is a terminal.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if int8 and format == "torchscript":
        raise ValueError("--int8 quantises with onnxruntime or OpenVINO's NNCF: use it with --format onnx or --format openvino")
    run = Path(run)
    model, card = load_model_dir(run)
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    path = export_path(run, format, int8, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = preprocess(card, parity_files(run, images, max_images + (calibration_images if int8 else 0), seed), console=console)
    checked = inputs[:max_images]
    # Calibrate on other images than those checked, when there are enough.
    calibration = inputs[max_images:] if len(inputs) > max_images else inputs[:calibration_images]
    step = f"exporting and calibrating int8 on {len(calibration)} images" if int8 else f"exporting to {format}"
    with activity(step, console=console):
        run_exported = write_export(model, card, format, int8, path, calibration)
    with torch.inference_mode():
        pairs = [(model(batch), run_exported(batch)) for batch in track(checked.split(32), f"checking {path.name} against the eager model", console=console, unit="batches")]
        eager = torch.cat([e for e, _ in pairs]).numpy()
        got = np.concatenate([g for _, g in pairs])
    report = ExportReport(
        path=path, format=format, images=len(checked), int8=int8,
        max_abs_diff=float(np.abs(got - eager).max()), top1_agreement=top1_agreement(got, eager),
    )  # fmt: skip
    write_sidecar(path, card)
    tolerance = tolerance if tolerance is not None else (None if int8 else 1e-3)
    min_agreement = min_agreement if min_agreement is not None else (97.0 if int8 else 100.0)
    if (tolerance is not None and report.max_abs_diff > tolerance) or report.top1_agreement < min_agreement:
        raise ValueError(
            f"{path} does not match the eager model on {report.images} images: max |logit difference| {report.max_abs_diff:.3g} "
            f"(allowed {tolerance}), top-1 agreement {report.top1_agreement:.2f}% (at least {min_agreement}%). "
            f"The file is kept for inspection."
        )
    return report


def export_path(run: Path, format: str, int8: bool, out: str | os.PathLike | None) -> Path:
    """Where the export goes: ``out``, checked to be a file of the format, else RUN/<the backend's file>."""
    default = "model.torchscript.pt" if format == "torchscript" else backend_class(EXPORT_BACKENDS[format, int8]).file
    path = Path(out) if out is not None else run / default
    wanted = {"onnx": ".onnx", "openvino": ".xml"}.get(format)
    if wanted and path.suffix != wanted:
        raise ValueError(f"--out {path}: a {format} export is a {wanted} file{' (its weights go beside it as .bin)' if format == 'openvino' else ''}: name it NAME{wanted}")
    return path


def write_export(
    model: torch.nn.Module, card: ModelCard, format: str, int8: bool, path: Path, calibration: torch.Tensor
) -> Callable[[torch.Tensor], np.ndarray]:
    """Write the export at ``path``; returns the exported model as a function of a batch (numpy logits)."""
    example = torch.zeros(2, 3, card.img_size, card.img_size)
    if format == "torchscript":
        write_torchscript(model, example, card, path)
        exported = load_torchscript(path)
        return lambda x: exported(x).detach().numpy()
    backend = get_backend(EXPORT_BACKENDS[format, int8])
    backend.export(model, example, card, path, calibration=calibration)
    forward = backend.load(None, torch.device("cpu"), path=path)
    return lambda x: forward(x).numpy()


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Percent of rows whose top-1 class is the same in ``logits`` and ``reference``."""
    return 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean())


def parity_files(run: Path, images: str | os.PathLike | None, count: int, seed: int) -> list[Path]:
    """Up to ``count`` image files (a seeded sample) from ``images`` or the run's val split."""
    files: list[Path] = []
    if images is None and (run / SPLIT_FILE).is_file():  # a split drawn from a root without val/: its val images
        split = SplitRecord.read(run / SPLIT_FILE)
        files = [Path(split.root, name) for name, _ in split.val if Path(split.root, name).is_file()]
    if images is None and not files:
        config = run / "config.yaml"
        data = None
        if config.is_file():
            import yaml

            data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data")
        folder = Path(data, "val") if data else None
        if folder is None or not folder.is_dir():
            raise ValueError(
                f"no images to check the export on: {run} does not name a val folder that exists here; pass --images DIR (any folder of images)"
            )
        images = folder
    if not files:
        files = iter_image_files(images) if Path(images).is_dir() else []
    if not files:
        raise ValueError(f"no images in {images} to check the export on: pass --images DIR, a folder of images")
    if len(files) > count:
        files = sorted(random.Random(seed).sample(files, count))
    return files


def preprocess(card: ModelCard, files: list[Path], *, console: Console | None = None) -> torch.Tensor:
    """The normalised float32 inputs [N, 3, H, W] of the readable ``files`` (contiguous NCHW), as
    the card's eval preprocessing makes them; unreadable files are left out."""
    transform = eval_transform(card.data_config)
    tensors = []
    for path in track(files, "reading images", console=console):
        try:
            tensors.append(load_sample(path, transform))
        except (BadImageError, ValueError, TypeError):
            continue
    if not tensors:
        raise ValueError(f"none of the {len(files)} images could be read: pass --images DIR with readable images")
    normalize = BatchNormalize.from_config(card.data_config, channels_last=True)
    with torch.inference_mode():
        return normalize(torch.stack(tensors)).float().contiguous()


def write_torchscript(model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is in maintenance: PyTorch says so at every call
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"imgrec.json": json.dumps(metadata(card))})


def load_torchscript(path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), _extra_files=extra_files if extra_files is not None else {}).eval()


def write_sidecar(path: Path, card: ModelCard) -> None:
    """The card beside an exported file, as ``FILE.json``."""
    write_json(path.with_name(path.name + ".json"), metadata(card))


def read_export_info(path: str | os.PathLike) -> dict[str, Any]:
    """The model card stored in an exported file (ONNX metadata or TorchScript extra file), as JSON."""
    path = Path(path)
    if path.suffix == ".onnx":
        return read_onnx_metadata(path)
    if path.suffix == ".xml":
        from imgrec.inference.backends.openvino import read_openvino_metadata

        return read_openvino_metadata(path)
    extra = {"imgrec.json": ""}
    load_torchscript(path, extra)
    return json.loads(extra["imgrec.json"])


__all__ = ["ExportReport", "FORMATS", "export", "load_torchscript", "parity_files", "preprocess", "read_export_info", "top1_agreement", "write_sidecar"]
