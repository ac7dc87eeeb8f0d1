"""Figures shared by the PNG files and the HTML report: drawn on a bare matplotlib Figure with
its own Agg canvas, never through pyplot, so no global state or display is touched."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LABELLED_CLASSES = 100  # beyond this the tick labels of the confusion heat map are unreadable
MAX_ANNOTATED_CLASSES = 30  # beyond this the counts no longer fit in the cells
LABEL_CHARS = 24  # class names longer than this are shortened on the axes


def short_label(name: str) -> str:
    """Shorten from the middle: class names often share a prefix (or a suffix) and differ at the other end."""
    if len(name) <= LABEL_CHARS:
        return name
    head = (LABEL_CHARS - 1) // 2
    return name[:head] + "\u2026" + name[-(LABEL_CHARS - 1 - head) :]


def confusion_figure(confusion: list[list[int]], classes: list[str]) -> Figure:
    """The row-normalised confusion matrix as a heat map: each row shows where a true class went.

    Rows are normalised so that small and large classes read on the same 0..1 scale; the raw
    counts are written in the non-zero cells up to 30 classes. Class names label both axes up to
    100 classes, beyond which they could not be read anyway; the resolution gives every class at
    least a pixel.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    num_classes = len(classes)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"confusion must be {num_classes} x {num_classes} for {num_classes} classes, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    labelled = num_classes <= MAX_LABELLED_CLASSES
    side = min(max(5.0, 0.28 * num_classes + 3.0), 32.0) if labelled else 12.0
    cell_points = 72.0 * (side - 3.0) / num_classes
    font_size = max(4.0, min(10.0, 0.7 * cell_points))
    dpi = min(300, max(100, int(np.ceil(1.5 * num_classes / side))))  # at least a pixel per class

    figure = Figure(figsize=(side + 1.5, side), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"Confusion matrix ({int(counts.sum())} images, {num_classes} classes, rows normalised)")
    if labelled:
        ticks = np.arange(num_classes)
        labels = [short_label(name) for name in classes]
        axes.set_xticks(ticks, labels=labels, rotation=90, fontsize=font_size)
        axes.set_yticks(ticks, labels=labels, fontsize=font_size)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for row, col in zip(*np.nonzero(counts), strict=True):
            colour = "white" if shares[row, col] > 0.5 else "black"
            axes.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=font_size, color=colour)
    figure.tight_layout()
    return figure


def lr_find_figure(lrs: list[float], losses: list[float], suggestion: float) -> Figure:
    """The learning-rate range test: the smoothed loss against the rate (log axis), the suggestion marked."""
    figure = Figure(figsize=(6.5, 4.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(lrs, losses, color="#1f77b4")
    axes.set_xscale("log")
    axes.axvline(suggestion, color="#d62728", linestyle="--", label=f"suggestion {suggestion:.2g}")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss (smoothed)")
    axes.set_title("learning-rate range test")
    axes.legend()
    figure.tight_layout()
    return figure


def reliability_figure(bins: list[dict], ece: float, temperature: float | None = None) -> Figure:
    """The reliability diagram: each confidence bin's accuracy as a bar against the diagonal a
    calibrated model would follow (gaps shaded), and below it how many images fall in each bin.

    ``bins`` are ``imgrec.calibration.reliability_bins``'s rows; ``ece`` (percent) and the
    ``temperature`` applied, if any, go in the title.
    """
    figure = Figure(figsize=(5.5, 6.0), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [(row["lower"] + row["upper"]) / 2 for row in bins]
    filled = [(c, row) for c, row in zip(centres, bins, strict=True) if row["n"]]
    top.bar([c for c, _ in filled], [row["accuracy"] for _, row in filled], width=width, color="#1f77b4", edgecolor="white", label="accuracy")
    top.bar(
        [c for c, _ in filled], [row["confidence"] - row["accuracy"] for _, row in filled], bottom=[row["accuracy"] for _, row in filled],
        width=width, fill=False, hatch="//", edgecolor="#d62728", label="gap to the mean confidence",
    )  # fmt: skip
    top.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    scaled = f", temperature {temperature:.3g}" if temperature not in (None, 1.0) else ""
    top.set_title(f"Reliability: ECE {ece:.2f}%{scaled}")
    top.legend(loc="lower right", fontsize="small", framealpha=0.85)
    bottom.bar(centres, [row["n"] for row in bins], width=width, color="#7f7f7f", edgecolor="white")
    bottom.set_xlabel("confidence of the top class")
    bottom.set_ylabel("images")
    figure.tight_layout()
    return figure


def write_reliability_png(bins: list[dict], ece: float, path: str | os.PathLike, temperature: float | None = None) -> Path:
    """Save ``reliability_figure`` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reliability_figure(bins, ece, temperature).savefig(path, format="png")
    return path


def write_confusion_png(confusion: list[list[int]], classes: list[str], path: str | os.PathLike) -> Path:
    """Save the row-normalised confusion matrix as a heat map: each row shows where a true class went.

    Rows are normalised so that small and large classes read on the same 0..1 scale; the raw
    counts are written in the non-zero cells up to 30 classes. Class names label both axes up to
    100 classes, beyond which they could not be read anyway. Uses an Agg canvas of its own, so no
    pyplot state or display is touched.
    """
    figure = confusion_figure(confusion, classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


__all__ = ["confusion_figure", "lr_find_figure", "reliability_figure", "short_label", "write_confusion_png", "write_reliability_png"]
