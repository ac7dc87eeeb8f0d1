"""A training run as one self-contained HTML file: charts, metrics, confusion matrix, example predictions.

The report is meant to be mailed, attached to an issue or opened on a laptop with no network, so
everything lives in the one file: charts and thumbnails are embedded as base64 data URIs, the CSS
is inline and there is no JavaScript. Charts are drawn on a bare ``matplotlib.figure.Figure`` with
the Agg canvas, never through pyplot, so building a report touches no global state, needs no
display and is safe inside a training process or a test run. Every string that comes from the
user (title, class names, file names, summary facts) is escaped, since class names are folder
names and may hold any character.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from imgrec.data.decode import BadImageError, load_rgb
from imgrec.plots import confusion_figure, reliability_figure
from imgrec.utils import atomic_write

THUMBNAIL_PX = 160  # longest side of an embedded prediction thumbnail

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline td { font-size: 1.3em; font-weight: 600; }
.charts img, .confusion img { max-width: 100%; height: auto; }
.bar { width: 160px; } .bar span { display: block; height: .8em; background: #4a78c2; }
.note { color: #666; font-style: italic; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.pred { width: 172px; border: 3px solid #bbb; border-radius: 6px; padding: 4px; font-size: 12px; overflow-wrap: anywhere; }
.pred img { display: block; margin: 0 auto 4px; max-width: 160px; max-height: 160px; }
.pred.correct { border-color: #2e9d48; background: #eef9f0; }
.pred.wrong { border-color: #d23c3c; background: #fdeeee; }
.missing { height: 120px; display: flex; align-items: center; justify-content: center; text-align: center;
           background: #eee; color: #555; margin-bottom: 4px; }
"""


def write_report(
    out: str | os.PathLike,
    *,
    title: str,
    history: list[dict],
    metrics: dict,
    predictions: list[dict],
    summary: dict[str, str] | None = None,
    mistakes: list[dict] | None = None,
) -> Path:
    """Write the HTML report of one run to ``out`` and return its path.

    ``history`` holds the rows of ``RUN/metrics.jsonl`` (may be empty), ``metrics`` the dict of
    ``imgrec.engine.evaluate.classification_metrics`` and ``predictions`` the examples to show
    (``image``, ``true``, ``pred``, ``prob``). Every prediction given is embedded, so the caller
    chooses how many: a sample, or the most confident mistakes. An image that cannot be read gets
    a placeholder naming the file, because a report should not fail over one moved file.
    ``mistakes``, where given, are the most confident wrong answers in the same form, each with
    a ``heatmap`` (the PNG of ``imgrec.inference.explain``, shown in place of the image).
    """
    sections = [
        f"<h1>{_esc(title)}</h1>",
        _key_value_table(summary) if summary else "",
        "<h2>Evaluation</h2>",
        _headline_table(metrics),
        "<h2>Training</h2>",
        _training_section(history),
        "<h2>Per-class accuracy</h2>",
        _per_class_table(metrics.get("per_class") or []),
        "<h2>Confusion matrix</h2>",
        _confusion_section(metrics.get("confusion") or [], [str(row.get("class", "")) for row in metrics.get("per_class") or []]),
        *(("<h2>Calibration</h2>", _calibration_section(metrics)) if metrics.get("reliability") else ()),
        *(("<h2>Groups</h2>", _groups_section(metrics["fairness"])) if metrics.get("fairness") else ()),
        "<h2>Predictions</h2>",
        _predictions_grid(predictions),
        *(("<h2>The most confident mistakes</h2>", _mistakes_section(mistakes)) if mistakes is not None else ()),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in sections if part)
        + "\n</body>\n</html>\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: f.write(page.encode("utf-8")))


# --- formatting ---------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for missing, non-numeric or NaN values (shown as a dash)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    number = _number(value)
    return "—" if number is None else f"{number:{spec}}{suffix}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], css_class: str = "", numeric: Iterable[int] = ()) -> str:
    """An HTML table from cells that are already escaped HTML; the ``numeric`` columns align right."""
    right = set(numeric)
    head = f"<tr>{''.join(f'<th>{cell}</th>' for cell in header)}</tr>\n" if header else ""
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{cell}</td>' if i in right else f"<td>{cell}</td>" for i, cell in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}>\n{head}" + "\n".join(body) + "\n</table>"


def _key_value_table(facts: dict[str, str]) -> str:
    return _table([], ([f"<b>{_esc(key)}</b>", _esc(value)] for key, value in facts.items()), "summary")


def _headline_table(metrics: dict) -> str:
    header = ["top-1", "top-5", "loss", "images"]
    row = [
        _fmt(metrics.get("top1"), ".2f", " %"),
        _fmt(metrics.get("top5"), ".2f", " %"),
        _fmt(metrics.get("loss"), ".4f"),
        _fmt(metrics.get("n"), ",.0f"),
    ]
    if _number(metrics.get("ece")) is not None:
        header.append("ECE")
        row.append(_fmt(metrics["ece"], ".2f", " %"))
    if _number(metrics.get("images_per_s")) is not None:
        header.append("images/s")
        row.append(_fmt(metrics["images_per_s"], ",.0f"))
    return _table(header, [row], "headline", numeric=range(len(header)))


def _per_class_table(per_class: list[dict]) -> str:
    if not per_class:
        return '<p class="note">no per-class results</p>'
    rows = []
    for entry in per_class:
        top1 = _number(entry.get("top1"))
        width = 0.0 if top1 is None else min(max(top1, 0.0), 100.0)
        bar = f'<div class="bar"><span style="width:{width:.1f}%"></span></div>'
        rows.append([_esc(entry.get("class", "")), _fmt(entry.get("n"), ",.0f"), _fmt(top1, ".2f", " %"), bar])
    return _table(["class", "images", "top-1", ""], rows, "per-class", numeric=(1, 2))


# --- charts -------------------------------------------------------------------------------------


def _png_data_uri(figure: Figure, dpi: int = 100) -> str:
    """Render ``figure`` with the Agg canvas (no pyplot, no display) and return it as a PNG data URI."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _column(history: list[dict], key: str) -> list[float]:
    """One metric over the epochs, NaN where a row lacks it (matplotlib leaves a gap there)."""
    values = []
    for row in history:
        number = _number(row.get(key))
        values.append(math.nan if number is None else number)
    return values


def _line_chart(history: list[dict], series: list[tuple[str, str]], title: str, ylabel: str, percent: bool) -> str:
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    axes = figure.add_subplot()
    for key, label in series:
        values = _column(history, key)
        if not all(math.isnan(v) for v in values):
            # Markers make a one-epoch run visible; they are dropped when the points would crowd.
            axes.plot(epochs, values, label=label, marker="o" if len(epochs) <= 40 else None, markersize=3)
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    if percent:
        axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    return _png_data_uri(figure)


def _training_section(history: list[dict]) -> str:
    if not history:
        return '<p class="note">no epochs recorded</p>'
    accuracy = [("val_top1", "val top-1"), ("val_top5", "val top-5")]
    has_ema = any(_number(row.get("ema_top1")) is not None for row in history)
    if has_ema:
        accuracy.append(("ema_top1", "EMA top-1"))
    loss_uri = _line_chart(history, [("train_loss", "train"), ("val_loss", "val")], "Loss", "loss", percent=False)
    accuracy_uri = _line_chart(history, accuracy, "Validation accuracy", "accuracy (%)", percent=True)
    charts = f'<div class="charts">{_img(loss_uri, "loss curves")}\n{_img(accuracy_uri, "accuracy curves")}</div>'

    columns = [("epoch", "epoch", ".0f"), ("train_loss", "train loss", ".4f"), ("val_loss", "val loss", ".4f")]
    columns += [("val_top1", "val top-1 %", ".2f"), ("val_top5", "val top-5 %", ".2f")]
    columns += [("ema_top1", "EMA top-1 %", ".2f")] if has_ema else []
    columns += [("lr", "lr", ".3g"), ("seconds", "seconds", ".1f"), ("images_per_s", "images/s", ",.0f")]
    rows = [[_fmt(row.get(key), spec) for key, _, spec in columns] for row in history]
    table = _table([label for _, label, _ in columns], rows, "epochs", numeric=range(len(columns)))
    return f"{charts}\n<details><summary>all {len(history)} epochs</summary>\n{table}\n</details>"


def _confusion_section(confusion: list[list[int]], class_names: list[str]) -> str:
    counts = np.asarray(confusion, dtype=np.int64)
    if counts.ndim != 2 or counts.size == 0 or counts.shape[0] != counts.shape[1]:
        return '<p class="note">no confusion matrix</p>'
    if len(class_names) != counts.shape[0]:  # metrics without per-class names still get a readable matrix
        class_names = [str(i) for i in range(counts.shape[0])]
    figure = confusion_figure(counts.tolist(), class_names)
    return f'<div class="confusion">{_img(_png_data_uri(figure, dpi=figure.dpi), "confusion matrix")}</div>'


def _groups_section(fairness: dict) -> str:
    """Each group's figures and the largest gaps between groups (``imgrec evaluate --groups``)."""
    classes = sorted({name for row in fairness["groups"] for name in row["recall"]})
    header = ["group", "images", "top-1", "ECE", *(f"recall: {_esc(c)}" for c in classes)]
    rows = [
        [_esc(r["group"]), _fmt(r["n"], ",.0f"), _fmt(r["top1"], ".2f", " %"), _fmt(r["ece"], ".2f", " %"), *(_fmt(r["recall"].get(c), ".1f", " %") for c in classes)]
        for r in fairness["groups"]
    ]
    gaps = fairness.get("gaps") or {}
    notes = []
    if gaps:
        notes.append(f"top-1 {gaps['top1']['gap']:.2f} points ({_esc(gaps['top1']['highest'])} over {_esc(gaps['top1']['lowest'])})")
        notes.append(f"ECE {gaps['ece']['gap']:.2f} points")
        if gaps.get("recall"):
            r = gaps["recall"]
            notes.append(f"recall of {_esc(r['class'])} {r['gap']:.2f} points ({_esc(r['highest'])} over {_esc(r['lowest'])})")
    note = f'<p class="note">Largest gaps between groups: {", ".join(notes)}.</p>' if notes else ""
    return note + _table(header, rows, "groups", numeric=range(1, len(header)))


def _calibration_section(metrics: dict) -> str:
    """The reliability diagram, and what the figures say: how far to trust a stated confidence."""
    temperature = metrics.get("temperature")
    figure = reliability_figure(metrics["reliability"], metrics["ece"], temperature)
    scaled = f"with the temperature {temperature:.3g} fitted by <code>imgrec calibrate</code>" if temperature else "as trained (not calibrated: <code>imgrec calibrate RUN --data VAL</code> fits a temperature)"
    note = (
        f'<p class="note">Probabilities {scaled}: expected calibration error {metrics["ece"]:.2f}%, NLL {metrics["nll"]:.4f}, '
        f"Brier score {metrics['brier']:.4f}. A bar below the diagonal: there the model is surer than it is right; above it, less sure.</p>"
    )
    return f'{note}\n<div class="confusion">{_img(_png_data_uri(figure), "reliability diagram")}</div>'


# --- predictions --------------------------------------------------------------------------------


def _thumbnail_data_uri(path: str | os.PathLike, enlarge: bool = False) -> str:
    """The image at ``path`` shrunk to at most THUMBNAIL_PX a side (with ``enlarge``, a smaller one
    grown to it: a heatmap at a 64 px model's input), as a JPEG data URI; raises BadImageError."""
    image = load_rgb(path)
    scale = THUMBNAIL_PX / max(image.size)
    if enlarge and scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _prediction_cell(item: dict) -> str:
    path = item.get("heatmap") or item.get("image", "")
    true, pred = item.get("true"), item.get("pred", "")
    verdict = "unlabelled" if true is None else ("correct" if str(true) == str(pred) else "wrong")
    try:
        picture = _img(_thumbnail_data_uri(path, enlarge="heatmap" in item), f"{pred} ({Path(path).name})")
    except BadImageError as exc:
        picture = f'<div class="missing">cannot open {_esc(Path(path).name)}<br>{_esc(exc.reason)}</div>'
    truth = "—" if true is None else _esc(true)
    return (
        f'<div class="pred {verdict}" title="{_esc(path)}">{picture}'
        f"<div><b>{_esc(pred)}</b> {_fmt(item.get('prob'), '.1%')}</div>"
        f"<div>true: {truth}</div></div>"
    )


def _mistakes_section(mistakes: list[dict]) -> str:
    if not mistakes:
        return '<p class="note">no mistakes on the images shown</p>'
    note = '<p class="note">The wrong answers the model was surest of, with a Grad-CAM heatmap of the class it chose: where it looked for that class (red: most).</p>'
    return note + "\n" + _predictions_grid(mistakes)


def _predictions_grid(predictions: list[dict]) -> str:
    if not predictions:
        return '<p class="note">no predictions</p>'
    return '<div class="grid">\n' + "\n".join(_prediction_cell(item) for item in predictions) + "\n</div>"
