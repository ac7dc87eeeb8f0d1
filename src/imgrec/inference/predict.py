"""``imgrec.load(RUN)`` and ``Classifier.predict``: class names and probabilities for any images.

The model directory gives everything: architecture and weights, and in its card the class
names and the eval preprocessing (size, crop_pct, interpolation, mean, std), so a prediction
sees exactly what validation saw. Inputs may be paths, folders, globs, PIL images or uint8 tensors; a file that
cannot be read becomes an error row naming it, and the rest are still predicted.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from rich.console import Console

from imgrec.calibration import tempered
from imgrec.card import ModelCard
from imgrec.data.decode import BadImageError, load_sample, to_rgb
from imgrec.data.folder import iter_image_files
from imgrec.data.transforms import BatchNormalize, eval_transform
from imgrec.data.tta import averaged, check_tta
from imgrec.hardware import flush_denormals, resolve_device, resolve_precision
from imgrec.inference.backends import get_backend
from imgrec.inference.choice import backend_file, choose_backend, default_backend
from imgrec.models.directory import load_model_dir
from imgrec.progress import track

GLOB_CHARS = "*?["


@dataclass
class Prediction:
    """The top-k classes of one input, best first; ``error`` is set (and the lists empty) if it failed."""

    source: str
    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    error: str | None = None
    names: list[str] = field(default_factory=list)  # human-readable names, when the model has them (ImageNet's words)

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None

    @property
    def prob(self) -> float | None:
        return self.probs[0] if self.probs else None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"source": self.source, "error": self.error}
        top = [{"class": c, "index": i, "prob": p} for c, i, p in zip(self.labels, self.indices, self.probs)]
        for entry, name in zip(top, self.names):
            entry["name"] = name
        return {"source": self.source, "top": top}


class Classifier:
    """A trained model with its card (classes, preprocessing), ready to predict.

    ``card`` is a ``ModelCard`` or its JSON form (model.json as a dict). ``loader`` picks the eval
    pipeline: ``fast`` (decode-and-crop, the default) or ``standard`` (decode everything, resize,
    centre crop, as torchvision's reference scripts do). ``backend`` runs the network
    (``imgrec.inference.backends``): None is PyTorch, channels_last, at ``precision``; a
    file-based one (``onnx``, ``onnx-int8``, ``openvino``, ``openvino-int8``) needs its file at ``path`` (or ``onnx_path``).
    """

    def __init__(
        self, model: torch.nn.Module, card: ModelCard | dict[str, Any], *, device: str = "auto", precision: str = "auto", loader: str = "fast",
        backend: str | None = None, path: str | os.PathLike | None = None, onnx_path: str | os.PathLike | None = None, tta: str | None = None,
    ):  # fmt: skip
        card = card if isinstance(card, ModelCard) else ModelCard.from_dict(card)
        card.check_preprocessing()
        path = path if path is not None else onnx_path
        self.card = card
        self.classes: list[str] = list(card.classes)
        self.class_names: dict[str, str] = dict(card.class_names)
        self.data_config = card.data_config
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        flush_denormals(self.device)
        self.backend = backend or default_backend(self.precision, self.device)
        runner = get_backend(self.backend)
        if runner.precision is not None:
            self.precision = resolve_precision(runner.precision, self.device)
        self.model = model.eval()
        self.forward = runner.load(self.model, self.device, precision=precision, path=path)
        self.normalize = BatchNormalize.from_config(self.data_config, channels_last=True).to(self.device)
        self.transform = eval_transform(self.data_config, loader)
        self.backend_reason = ""  # why load() chose this backend
        self.source: Path | None = None  # the model directory load() read, if any
        self.tta = check_tta(tta, None)  # the views whose logits are averaged (imgrec.data.tta); None: the image once

    def __repr__(self) -> str:
        return f"Classifier({self.card.architecture}, {len(self.classes)} classes, {self.device}, {self.backend})"

    @property
    def info(self) -> dict[str, Any]:
        """The card's JSON form: what model.json holds."""
        return self.card.to_dict()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits on the CPU for a uint8 batch [B, 3, H, W] already at the model's input size
        (averaged over the ``tta`` views where the classifier has them)."""
        return averaged(self.forward, self.normalize(images.to(self.device, non_blocking=True)), self.tta)

    def predict(self, inputs: Any, topk: int = 5, batch_size: int = 32, *, console: Console | None = None) -> list[Prediction]:
        """Top-``topk`` classes and probabilities for each input, in input order.

        ``inputs``: one or a list of paths (files, folders, globs), PIL images or uint8 tensors
        ([3, H, W] or [B, 3, H, W], any size: they get the eval resize and crop). A bar of the
        batches shows on ``console`` where it is a terminal.
        """
        items = list(expand_inputs(inputs))
        results: list[Prediction] = []
        for start in track(range(0, len(items), batch_size), f"predicting {len(items)} images", console=console, unit="batches"):
            chunk = items[start : start + batch_size]
            prepared = [self._prepare(source, item) for source, item in chunk]
            good = [(i, t) for i, t in enumerate(prepared) if isinstance(t, torch.Tensor)]
            rows = [p if isinstance(p, Prediction) else Prediction(source) for (source, _), p in zip(chunk, prepared)]
            if good:
                ranked = self.rank(self.logits(torch.stack([t for _, t in good])), topk, [rows[i].source for i, _ in good])
                for (i, _), row in zip(good, ranked):
                    rows[i] = row
            results.extend(rows)
        return results

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The softmax of ``logits`` divided by the card's temperature (``imgrec calibrate``; none: 1)."""
        return torch.softmax(tempered(logits.float(), self.card.temperature), dim=1)

    def rank(self, logits: torch.Tensor, topk: int, sources: list[str]) -> list[Prediction]:
        """A ``Prediction`` per row of ``logits``: the top-``topk`` classes by (calibrated) probability."""
        values, indices = self.probabilities(logits).topk(max(1, min(topk, len(self.classes))), dim=1)
        rows = []
        for source, vals, idx in zip(sources, values.tolist(), indices.tolist()):
            labels = [self.classes[j] for j in idx]
            names = [self.class_names.get(label, label) for label in labels] if self.class_names else []
            rows.append(Prediction(source, labels=labels, probs=vals, indices=idx, names=names))
        return rows

    def _prepare(self, source: str, item: Any) -> torch.Tensor | Prediction:
        try:
            if isinstance(item, Prediction):
                return item
            if isinstance(item, (str, os.PathLike)):
                return load_sample(item, self.transform)
            if isinstance(item, Image.Image):  # the same conversions as a file gets (alpha, 16-bit, EXIF)
                image = to_rgb(ImageOps.exif_transpose(item))
            elif isinstance(item, torch.Tensor):
                from torchvision.transforms.v2.functional import to_pil_image

                if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] not in (1, 3):
                    raise ValueError(f"expected a uint8 tensor [3, H, W], got {item.dtype} {list(item.shape)}")
                image = to_pil_image(item).convert("RGB")
            else:
                raise TypeError(f"cannot predict a {type(item).__name__}: pass paths, PIL images or uint8 tensors")
            return self.transform(image)
        except BadImageError as exc:
            return Prediction(source, error=exc.reason)
        except (ValueError, TypeError) as exc:
            return Prediction(source, error=str(exc))


def expand_inputs(inputs: Any) -> Iterator[tuple[str, Any]]:
    """(source name, item) pairs: folders and globs expand to their image files, sorted."""
    if isinstance(inputs, (str, os.PathLike, Image.Image)) or (isinstance(inputs, torch.Tensor) and inputs.ndim == 3):
        inputs = [inputs]
    counter = 0
    for item in inputs if isinstance(inputs, Iterable) else [inputs]:
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            for image in item:
                yield f"<tensor {counter}>", image
                counter += 1
        elif isinstance(item, (str, os.PathLike)):
            yield from expand_path(str(item))
        else:
            name = f"<{'image' if isinstance(item, Image.Image) else type(item).__name__.lower()} {counter}>"
            counter += 1
            yield name, item


def expand_path(text: str) -> Iterator[tuple[str, Any]]:
    path = Path(text)
    if path.is_dir():
        files = iter_image_files(path)
        if not files:
            yield text, Prediction(text, error="folder holds no image files")
        yield from ((str(f), f) for f in files)
    elif path.exists():
        yield text, path
    elif any(c in text for c in GLOB_CHARS):
        matches = sorted(glob.glob(text, recursive=True))
        files = [m for m in matches if Path(m).is_file()]
        if not files:
            yield text, Prediction(text, error="pattern matches no files")
        yield from ((m, Path(m)) for m in files)
    else:
        yield text, Prediction(text, error="no such file or folder")


def load(
    run: str | os.PathLike, *, device: str = "auto", precision: str = "auto", loader: str = "fast", backend: str | None = "auto", tta: str | None = None
) -> Classifier:
    """The classifier in a model directory (``imgrec train --out RUN``); reads only safetensors, JSON and ONNX.

    ``tta`` (``flip``, ``crops``, ``flip+crops``) averages the logits of several views of each
    image (``imgrec.data.tta``; refused where the run trained without flips and asks for them).

    ``backend``: ``auto`` takes the fastest one ``imgrec benchmark RUN`` recorded for these weights
    (``imgrec.inference.choice.choose_backend``; ``backend_reason`` says why), a name from
    ``imgrec.inference.backends.BACKENDS`` that one, None PyTorch at ``precision``.
    """
    tta = check_tta(tta, run)
    model, card = load_model_dir(run)
    reason = "asked for"
    chosen = backend
    if backend == "auto":
        chosen, reason = choose_backend(run, resolve_device(device), precision)
    file = backend_file(chosen) if chosen is not None else None
    path = Path(run) / file if file else None
    try:
        classifier = Classifier(model, card, device=device, precision=precision, loader=loader, backend=chosen, path=path, tta=tta)
    except Exception as exc:
        if backend != "auto" or path is None:
            raise
        # the benchmarked file no longer opens: PyTorch rather than no predictions
        chosen, reason = default_backend(precision, resolve_device(device)), f"{path} does not load ({type(exc).__name__}: {exc})"
        classifier = Classifier(model, card, device=device, precision=precision, loader=loader, backend=chosen, tta=tta)
    classifier.backend_reason = reason if backend else f"--precision {precision}"
    classifier.source = Path(run)  # the model directory, for what must match its weights (a search index)
    return classifier


__all__ = ["Classifier", "Prediction", "expand_inputs", "load"]
