"""Evaluation: logits over a loader, and accuracy and confusion from them.

``collect_logits`` keeps the model's forward pass apart from the arithmetic, so the metrics are a
pure function of (logits, labels) that tests can check by hand and that can be recomputed from
saved logits without running the model again. ``evaluate`` runs a model directory over labelled
images (``imgrec.data.labels``: an ImageFolder holding some of the model's classes, or a flat
folder with a labels file) and adds timing, the unreadable files, a confusion matrix PNG and the
calibration figures (``imgrec.calibration``: ECE, NLL, Brier score, a reliability diagram PNG).
``model_outputs`` is the part that runs the model, shared with ``imgrec calibrate``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from imgrec.calibration import calibration_metrics, tempered
from imgrec.card import ModelCard
from imgrec.data.folder import DEFAULT_MAX_BAD_FRACTION, SkipLog
from imgrec.data.labels import evaluation_dataset, read_groups_file
from imgrec.data.loader import create_loader
from imgrec.data.splits import SPLIT_FILE, recorded_val
from imgrec.data.transforms import BatchNormalize, eval_transform
from imgrec.data.tta import averaged, check_tta
from imgrec.hardware import DTYPES, flush_denormals, resolve_device, resolve_precision
from imgrec.models.directory import load_model_dir
from imgrec.progress import track
from imgrec.utils import write_json

TOP_K = 5


def collect_logits(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    normalize: torch.nn.Module,
    autocast_dtype: torch.dtype | None = None,
    tta: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, C], int64 labels [N]) on the CPU for every batch of ``loader``, in order.

    ``loader`` yields uint8 NCHW images and labels; ``normalize`` (a ``BatchNormalize`` already on
    ``device``) turns the images into the model's input on the device. Logits stay on the device
    until the end, so no batch waits on a device-to-host copy. The model's train/eval mode is
    restored afterwards, so evaluating in the middle of training does not leave it in eval mode.
    ``tta`` averages the logits of several views of each batch (``imgrec.data.tta``).
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
                    outputs = averaged(model, inputs, tta)
                logits.append(outputs.float())
                labels.append(torch.as_tensor(targets).to(torch.int64))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the loader yielded no batches: the evaluation dataset is empty (check its folder or labels file)")
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent), balanced accuracy and macro F1 (over the classes present),
    mean cross-entropy, per-class top-1 (= recall), precision and F1, and the confusion matrix.

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
    per_class_predicted = confusion.sum(dim=0).tolist()
    per_class_correct = confusion.diagonal().tolist()
    per_class = [class_scores(*counts) for counts in zip(classes, per_class_n, per_class_predicted, per_class_correct, strict=True)]
    present = [row for row in per_class if row["n"]]
    return {
        "n": int(n),
        "top1": 100.0 * int(hits[:, 0].sum()) / n,
        "top5": 100.0 * int(hits.any(dim=1).sum()) / n,
        "balanced_accuracy": sum(row["recall"] for row in present) / len(present),  # the mean recall of the classes present
        "macro_f1": sum(row["f1"] for row in present) / len(present),
        "loss": float(F.cross_entropy(logits, labels)),
        "per_class": per_class,
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


def class_scores(name: str, count: int, predicted: int, correct: int) -> dict[str, Any]:
    """One class's row, in percent: top-1 (its images predicted right, which is its recall),
    precision (its predictions that are right), F1; None where there is nothing to divide by."""
    recall = 100.0 * correct / count if count else None
    precision = 100.0 * correct / predicted if predicted else (0.0 if count else None)  # never predicted: 0, as scikit-learn counts it
    f1 = None if not count else (2 * precision * recall / (precision + recall) if correct else 0.0)
    return {"class": name, "n": count, "top1": recall, "recall": recall, "precision": precision, "f1": f1}


@dataclass
class Outputs:
    """A model's logits on a labelled set, with what evaluate reports beside them."""

    logits: torch.Tensor  # float32 [N, C], as the network gives them (no temperature)
    labels: torch.Tensor  # int64 [N]
    card: ModelCard
    seconds: float  # loading and the model together
    skipped: list[dict[str, str]]  # unreadable files, each with its reason
    precision: str
    paths: list[str]  # the file of each row, resolved
    folders: list[str]  # where the images were found: the folder evaluated, the dataset root


def model_outputs(
    run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    loader: str = "fast",
    tta: str | None = None,
    console: Console | None = None,
) -> Outputs:
    """The logits of the model directory ``run`` on every readable image of ``data`` (see ``evaluate``)."""
    tta = check_tta(tta, run)
    model, card = load_model_dir(run)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    flush_denormals(dev)
    model.to(dev, memory_format=torch.channels_last)
    skip_log = SkipLog()
    try:
        transform, options = eval_transform(card.data_config, loader), {"skip_log": skip_log, "max_bad_fraction": max_bad_fraction}
        held_out = recorded_val(data, Path(run) / SPLIT_FILE, card.classes, transform, **options)  # the images the run held out of this folder
        dataset = held_out or evaluation_dataset(data, card.classes, transform, labels=labels, **options)
        batches = create_loader(dataset, batch_size=batch_size, train=False, num_workers=workers, skip_none=True, channels_last=True)
        normalize = BatchNormalize.from_config(card.data_config, channels_last=True).to(dev)
        started = time.perf_counter()
        with contextlib.closing(track(batches, f"evaluating {run}", console=console, unit="batches")) as shown:  # the bar goes if a batch fails
            logits, targets = collect_logits(model, shown, device=dev, normalize=normalize, autocast_dtype=DTYPES[precision], tta=tta)
        seconds = time.perf_counter() - started
        skipped = [{"path": path, "reason": reason} for path, reason in skip_log.entries().items()]
    finally:
        skip_log.path.unlink(missing_ok=True)
    left_out = {entry["path"] for entry in skipped}
    paths = [str(Path(path).resolve()) for path, _ in dataset.samples if path not in left_out]  # the loader keeps the dataset's order
    if len(paths) != len(targets):
        paths = []  # a dataset whose rows cannot be traced to files: no per-file figures
    return Outputs(logits, targets, card, seconds, skipped, precision, paths, [str(data), str(getattr(dataset, "root", data))])


def group_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], groups: list[str | None]) -> dict[str, Any]:
    """Top-1, ECE and per-class recall (percent) of each group of images (``groups[i]`` names row
    i's group, None: none), and the largest gaps between groups: in top-1, in ECE, and the class
    whose recall differs most between two groups."""
    rows = []
    for name in sorted({g for g in groups if g is not None}):
        mask = torch.tensor([g == name for g in groups])
        scores = classification_metrics(logits[mask], labels[mask], classes)
        recall = {row["class"]: row["recall"] for row in scores["per_class"] if row["n"]}
        rows.append({"group": name, "n": scores["n"], "top1": scores["top1"], "ece": calibration_metrics(logits[mask], labels[mask])["ece"], "recall": recall})
    gaps: dict[str, Any] = {}
    if len(rows) > 1:
        for key in ("top1", "ece"):
            low, high = min(rows, key=lambda r: r[key]), max(rows, key=lambda r: r[key])
            gaps[key] = {"gap": high[key] - low[key], "highest": high["group"], "lowest": low["group"]}
        spreads = []
        for name in classes:
            present = [(r["recall"][name], r["group"]) for r in rows if name in r["recall"]]
            if len(present) > 1:
                (low, low_group), (high, high_group) = min(present), max(present)
                spreads.append({"class": name, "gap": high - low, "highest": high_group, "lowest": low_group})
        gaps["recall"] = max(spreads, key=lambda g: g["gap"]) if spreads else None
    return {"groups": rows, "gaps": gaps, "ungrouped": sum(g is None for g in groups)}


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
    reliability_png: str | os.PathLike | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    loader: str = "fast",
    tta: str | None = None,
    groups: str | os.PathLike | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate the model directory ``run`` on ``data``; returns ``classification_metrics``,
    ``calibration_metrics`` (ECE, NLL, Brier score, the reliability bins) and timing.

    ``data`` is an ImageFolder (or a dataset root, whose ``val/`` is used), or a flat folder with a
    ``labels`` file. A root without ``val/`` that the run drew its split from gives that split's
    val images (the run's split.json), not every image. The result adds ``images_per_s`` (model and loading together), ``seconds`` and
    ``skipped`` (unreadable files, each with its reason); ``json_path``, ``confusion_png`` and
    ``reliability_png`` write it to disk. Unreadable files are left out; more than ``max_bad_fraction`` of them is an error.
    ``loader`` is the eval pipeline: ``fast`` (decode-and-crop) or ``standard`` (torchvision's).
    The model runs in PyTorch, channels_last, at ``precision`` (``auto``: bf16 where the hardware has it).
    ``tta`` (``flip``, ``crops``, ``flip+crops``) averages the logits of several views of each image.
    ``groups``, a ``filename,group`` CSV, adds ``group_metrics`` under ``fairness``.
    The card's temperature (``imgrec calibrate``), if any, divides the logits first: the
    probabilities, loss and calibration are the calibrated model's, top-1 is the same either way.
    A bar of the batches shows on ``console`` where it is a terminal.
    """
    if groups is not None:
        read_groups_file(groups)  # its form, before the long part
    out = model_outputs(
        run, data, labels=labels, batch_size=batch_size, workers=workers, device=device, precision=precision,
        max_bad_fraction=max_bad_fraction, loader=loader, tta=tta, console=console,
    )  # fmt: skip
    card = out.card
    logits = tempered(out.logits, card.temperature)
    metrics = classification_metrics(logits, out.labels, card.classes)
    metrics.update(calibration_metrics(logits, out.labels), temperature=card.temperature)
    if groups is not None:
        if not out.paths:
            raise ValueError(f"--groups: the rows of {data} cannot be traced to their files, so they cannot be grouped")
        by_file = read_groups_file(groups, out.folders)
        metrics["fairness"] = {"file": str(groups), **group_metrics(logits, out.labels, card.classes, [by_file.get(p) for p in out.paths])}
    metrics.update(
        images_per_s=round(len(out.labels) / out.seconds, 2), seconds=round(out.seconds, 3), skipped=out.skipped, data=str(data), run=str(run),
        precision=out.precision, loader=loader, tta=tta,
    )  # fmt: skip
    write_outputs(metrics, card, json_path, confusion_png, reliability_png)
    return metrics


def write_outputs(metrics: dict[str, Any], card: ModelCard, json_path: Any, confusion_png: Any, reliability_png: Any) -> None:
    """The files evaluate was asked for: the metrics as JSON, the confusion matrix and the reliability diagram."""
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, metrics)
    if confusion_png is not None or reliability_png is not None:
        from imgrec.plots import write_confusion_png, write_reliability_png  # matplotlib: only for the pictures, not for every training run's start

        if confusion_png is not None:
            write_confusion_png(metrics["confusion"], card.classes, confusion_png)
        if reliability_png is not None:
            write_reliability_png(metrics["reliability"], metrics["ece"], reliability_png, card.temperature)


__all__ = ["TOP_K", "Outputs", "classification_metrics", "collect_logits", "evaluate", "group_metrics", "model_outputs"]
