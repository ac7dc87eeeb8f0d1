"""Evaluation: logits over a loader, accuracy and confusion from them, and the datasets to feed it.

``collect_logits`` keeps the model's forward pass apart from the arithmetic, so the metrics are a
pure function of (logits, labels) that tests can check by hand and that can be recomputed from
saved logits without running the model again. Images come as an ImageFolder root (a subset of
the model's classes is fine) or as a flat folder with a labels file: a ``filename,class`` CSV or
ILSVRC's ground-truth list of one integer per image.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imgrec.data.decode import DEFAULT_MAX_PIXELS
from imgrec.data.folder import (
    DEFAULT_MAX_BAD_FRACTION,
    DatasetError,
    ImageFolderDataset,
    SkipLog,
    _some,
    find_classes,
    iter_image_files,
)

TOP_K = 5


def collect_logits(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    normalize: torch.nn.Module,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, C], int64 labels [N]) on the CPU for every batch of ``loader``, in order.

    ``loader`` yields uint8 NCHW images and labels; ``normalize`` (a ``BatchNormalize`` already on
    ``device``) turns the images into the model's input on the device. Logits stay on the device
    until the end, so no batch waits on a device-to-host copy. The model's train/eval mode is
    restored afterwards, so evaluating in the middle of training does not leave it in eval mode.
    """
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for batch in loader:
                if batch is None:  # every file of this batch was unreadable (see the dataset's skip log)
                    continue
                images, targets = batch
                inputs = normalize(images.to(device, non_blocking=True))
                with autocast:
                    outputs = model(inputs)
                logits.append(outputs.float())
                labels.append(torch.as_tensor(targets).to(torch.int64))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the loader yielded no batches: the evaluation dataset is empty (check its folder or labels file)")
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent), mean cross-entropy, per-class top-1 and the confusion matrix.

    Top-5 uses ``k = min(5, C)``, so with five classes or fewer it is 100. The predicted class is
    the first index of ``torch.topk``, the same one top-1 counts, so the confusion matrix's
    diagonal always agrees with top-1 even when logits tie. Rows of ``confusion`` are true
    classes, columns predicted ones. Every value is a plain int, float, str or None (JSON-ready).
    """
    _check_inputs(logits, labels, classes)
    n, num_classes = logits.shape
    logits = logits.detach().float().cpu()
    labels = labels.detach().to(torch.int64).cpu()
    top = logits.topk(min(TOP_K, num_classes), dim=1).indices
    hits = top.eq(labels[:, None])
    predicted = top[:, 0]
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )
    per_class_n = confusion.sum(dim=1).tolist()
    per_class_correct = confusion.diagonal().tolist()
    return {
        "n": int(n),
        "top1": 100.0 * int(hits[:, 0].sum()) / n,
        "top5": 100.0 * int(hits.any(dim=1).sum()) / n,
        "loss": float(F.cross_entropy(logits, labels)),
        "per_class": [
            {"class": name, "n": count, "top1": 100.0 * correct / count if count else None}
            for name, count, correct in zip(classes, per_class_n, per_class_correct, strict=True)
        ],
        "confusion": confusion.tolist(),
    }


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [samples, classes], got shape {tuple(logits.shape)}")
    if not classes:
        raise ValueError("the class list is empty: pass the model's class names in index order")
    if logits.shape[1] != len(classes):
        raise ValueError(
            f"logits have {logits.shape[1]} columns but there are {len(classes)} class names: "
            f"the class list must be the model's, in index order"
        )
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per row of logits ({logits.shape[0]}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("no samples to evaluate: logits and labels are empty")
    out_of_range = (labels < 0) | (labels >= len(classes))
    if out_of_range.any():
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"{int(out_of_range.sum())} label(s) outside 0..{len(classes) - 1}, e.g. label {int(labels[first])} "
            f"at position {first}: labels must index the model's {len(classes)} classes"
        )
    bad = ~torch.isfinite(logits)
    if bad.any():
        raise ValueError(
            f"{int(bad.any(dim=1).sum())} of {logits.shape[0]} rows of logits hold NaN or infinity: the model "
            f"diverged, or overflowed under reduced precision (evaluate in float32 to tell which)"
        )


def write_confusion_png(confusion: list[list[int]], classes: list[str], path: str | os.PathLike) -> Path:
    """Save the row-normalised confusion matrix as a heat map: each row shows where a true class went.

    Rows are normalised so that small and large classes read on the same 0..1 scale; the raw
    counts are written in the non-zero cells up to 30 classes. Class names label both axes up to
    100 classes, beyond which they could not be read anyway. Uses an Agg canvas of its own, so no
    pyplot state or display is touched.
    """
    from imgrec.plots import confusion_figure

    figure = confusion_figure(confusion, classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


class LabelledFiles(ImageFolderDataset):
    """An ``ImageFolderDataset`` over a given list of (path, class index) instead of a folder scan.

    Loading, skipping bad files into ``skip_log`` and the ``max_bad_fraction`` limit are the
    parent's; only where the samples come from differs (a labels file, or the class folders of
    an evaluation set that holds some of the model's classes). ``root`` names the images' folder
    in error messages.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        root: str | os.PathLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        skip_log: SkipLog | None = None,
        replace_bad: bool = False,
    ):
        # The parent's __init__ is skipped on purpose: it would scan root and require every class folder.
        self.root = Path(root)
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bad_fraction = max_bad_fraction
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.replace_bad = replace_bad  # evaluation: a bad file counts nowhere rather than as its neighbour

    def __repr__(self) -> str:
        return f"LabelledFiles({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


def read_labels_file(path: str | os.PathLike, classes: list[str], image_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """(image path, class index) for each image a labels file names, the format read from its content.

    - CSV ``filename,class`` (an optional ``filename,class`` header line is skipped): the filename
      is relative to ``image_dir`` or absolute; the class is one of ``classes`` by name, or else a
      0-based index into ``classes``. A name wins over an index, so numeric folder names work.
    - ILSVRC's ground-truth list (e.g. ``ILSVRC2012_validation_ground_truth.txt``): one integer per
      line, the i-th line labelling the i-th image of ``image_dir`` sorted by name. The integers are
      ILSVRC's 1-based ids, read as positions in ``classes`` (k -> ``classes[k - 1]``), so
      ``classes`` must be in ILSVRC id order for ILSVRC's file.
    """
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise ValueError(f"labels file {path} does not exist: pass a filename,class CSV or an ILSVRC ground-truth list")
    if not image_dir.is_dir():
        raise DatasetError(
            f"image folder {image_dir} does not exist or is not a folder: pass the folder the labels file describes"
        )
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise ValueError(f"labels file {path} is empty: it needs one filename,class line per image, or one integer per image")
    if "," in first:
        return _read_csv(path, lines, classes, image_dir)
    return _read_integer_list(path, lines, classes, image_dir)


def _read_csv(path: Path, lines: list[str], classes: list[str], image_dir: Path) -> list[tuple[str, int]]:
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    missing: list[tuple[int, str]] = []
    for number, row in enumerate(csv.reader(io.StringIO("\n".join(lines))), start=1):
        fields = [field.strip() for field in row]
        if not any(fields):
            continue
        if not samples and [f.lower() for f in fields] == ["filename", "class"]:
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}, line {number}: expected 2 columns filename,class, got {len(fields)}: {','.join(row)!r}")
        filename, value = fields
        label = _class_index(value, class_to_idx, classes, where=f"{path}, line {number}")
        image = image_dir / filename
        if filename in seen:
            raise ValueError(
                f"{path}, line {number}: {filename!r} is listed twice (first on line {seen[filename]}); list each image once"
            )
        seen[filename] = number
        if not image.is_file():
            missing.append((number, filename))
        samples.append((str(image), label))
    if missing:
        number, filename = missing[0]
        more = f" ({len(missing) - 1} more listed files are missing too)" if len(missing) > 1 else ""
        raise ValueError(
            f"{path}, line {number}: image {filename!r} not found in {image_dir}{more}. "
            f"Filenames are relative to the image folder (or absolute): check the folder passed with the labels file"
        )
    if not samples:
        raise ValueError(f"labels file {path} is empty: it has a header but no filename,class lines")
    return samples


def _class_index(value: str, class_to_idx: dict[str, int], classes: list[str], *, where: str) -> int:
    """The index of a class given by name or by 0-based index, or an error suggesting close names."""
    if value in class_to_idx:
        return class_to_idx[value]
    try:
        index = int(value)
    except ValueError:
        close = difflib.get_close_matches(value, classes, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else f" Known classes: {_some(classes)}."
        raise ValueError(
            f"{where}: unknown class {value!r}, not one of the model's {len(classes)} classes.{hint} "
            f"(A header line, if any, must read exactly filename,class.)"
        ) from None
    if not 0 <= index < len(classes):
        raise ValueError(
            f"{where}: class index {index} is out of range: the model has {len(classes)} classes, indices 0..{len(classes) - 1}"
        )
    return index


def _read_integer_list(path: Path, lines: list[str], classes: list[str], image_dir: Path) -> list[tuple[str, int]]:
    labels = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        try:
            value = int(text)
        except ValueError:
            what = "is blank" if not text else f"holds {text!r}, not an integer"
            raise ValueError(
                f"{path}, line {number} {what}: a file without commas is read as ILSVRC's ground-truth list, "
                f"one integer class id per line (for filenames use a filename,class CSV)"
            ) from None
        if not 1 <= value <= len(classes):
            raise ValueError(
                f"{path}, line {number}: class id {value} is out of range: ILSVRC ids are 1-based positions in the "
                f"model's {len(classes)} classes, 1..{len(classes)}"
            )
        labels.append(value - 1)
    images = iter_image_files(image_dir)
    if len(images) != len(labels):
        raise ValueError(
            f"{path} has {len(labels)} labels but {image_dir} holds {len(images)} images: an integer list labels "
            f"the folder's images one per line in sorted order, so the counts must match (wrong folder or file?)"
        )
    return [(str(image), label) for image, label in zip(images, labels, strict=True)]


def evaluation_dataset(
    data: str | os.PathLike,
    classes: list[str],
    transform: Callable[[Any], Any] | None,
    *,
    labels: str | os.PathLike | None = None,
    **dataset_options: Any,
) -> LabelledFiles:
    """The images to evaluate a model with ``classes`` on, labelled with the model's class indices.

    With ``labels``, ``data`` is a flat folder described by that file (``read_labels_file``).
    Without, ``data`` is an ImageFolder root, or a dataset root holding ``train/`` and ``val/``
    (then ``val/`` is used). Its class folders must all be classes of the model; model classes
    without a folder are allowed (their per-class count is 0), so a subset can be evaluated.
    ``dataset_options`` are ``max_pixels``, ``max_bad_fraction`` and ``skip_log``.
    """
    data = Path(data)
    if labels is not None:
        return LabelledFiles(read_labels_file(labels, classes, data), classes, transform, root=data, **dataset_options)
    root = data / "val" if (data / "val").is_dir() and (data / "train").is_dir() else data
    folder_classes = find_classes(root)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folder_classes if name not in class_to_idx]
    if unknown:
        raise DatasetError(
            f"{len(unknown)} class folder(s) in {root} are not classes of the model: {_some(unknown)}. "
            f"The model knows {len(classes)} classes ({_some(classes, 5)}); "
            f"remove those folders, or evaluate with the model trained on them"
        )
    samples = [(str(f), class_to_idx[name]) for name in folder_classes for f in iter_image_files(root / name)]
    if not samples:
        raise DatasetError(f"no images in the class folders of {root}: nothing to evaluate")
    return LabelledFiles(samples, classes, transform, root=root, **dataset_options)


def evaluate(
    run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    json_path: str | os.PathLike | None = None,
    confusion_png: str | os.PathLike | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    loader: str = "fast",
) -> dict[str, Any]:
    """Evaluate the model directory ``run`` on ``data``; returns ``classification_metrics`` plus timing.

    ``data`` is an ImageFolder (or a dataset root, whose ``val/`` is used), or a flat folder with a
    ``labels`` file. The result adds ``images_per_s`` (model and loading together), ``seconds`` and
    ``skipped`` (unreadable files, each with its reason); ``json_path`` and ``confusion_png``
    write it to disk. Unreadable files are left out; more than ``max_bad_fraction`` of them is an error.
    ``loader`` is the eval pipeline: ``fast`` (decode-and-crop) or ``standard`` (torchvision's).
    """
    import time

    from imgrec.data.loader import create_loader
    from imgrec.engine.hardware import DTYPES
    from imgrec.predict import load
    from imgrec.utils import write_json

    classifier = load(run, device=device, precision=precision, loader=loader, backend=None)
    skip_log = SkipLog()
    try:
        dataset = evaluation_dataset(
            data, classifier.classes, classifier.transform, labels=labels, skip_log=skip_log, max_bad_fraction=max_bad_fraction
        )
        batches = create_loader(dataset, batch_size=batch_size, train=False, num_workers=workers, skip_none=True, channels_last=True)
        started = time.perf_counter()
        logits, targets = collect_logits(
            classifier.model, batches, device=classifier.device, normalize=classifier.normalize, autocast_dtype=DTYPES[classifier.precision]
        )
        seconds = time.perf_counter() - started
        skipped = [{"path": path, "reason": reason} for path, reason in skip_log.entries().items()]
    finally:
        skip_log.path.unlink(missing_ok=True)
    metrics = classification_metrics(logits, targets, classifier.classes)
    metrics.update(
        images_per_s=round(len(targets) / seconds, 2),
        seconds=round(seconds, 3),
        skipped=skipped,
        data=str(data),
        run=str(run),
        precision=classifier.precision,
        loader=loader,
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, metrics)
    if confusion_png is not None:
        write_confusion_png(metrics["confusion"], classifier.classes, confusion_png)
    return metrics

