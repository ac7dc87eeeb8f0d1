"""``imgrec demo``: the whole path on a CPU in a few minutes, ending in an HTML report.

Synthetic dataset (cached) -> train a small timm model -> evaluate -> predict a few val images
-> ``OUT/report.html`` with the curves, the confusion matrix and a grid of predictions. The
recipe is one table (``DEMO_RECIPE``); the dataset is the built-in shapes task without the
background clutter (no stripes, noise, blobs or occluding lines: ``clutter=0``) and with smaller
images than ``imgrec synth``'s default, so that two CPU cores learn it to over 90% top-1 in
about three minutes. With full clutter, resnet10t needs far more epochs (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from imgrec.data.synth import SynthSpec, write_synth_dataset

DEMO_DATA = SynthSpec(classes=10, train_per_class=300, val_per_class=60, seed=0, min_side=96, max_side=128, clutter=0.0)

DEMO_RECIPE: dict[str, Any] = {
    "model": "resnet10t",
    "epochs": 12,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "data_config": {"img_size": 64, "crop_pct": 1.0, "scale": (0.8, 1.0), "interpolation": "bilinear"},
}

RUN_FILES = ("last.pt", "metrics.jsonl", "model.safetensors", "model.json", "config.yaml", "classes.json", "skipped.jsonl", "tensorboard", "explain", "reliability.png")


def demo_dataset(folder: str | os.PathLike, spec: SynthSpec = DEMO_DATA, console: Console | None = None) -> Path:
    """The demo dataset in ``folder``, written once: reused while its ``imgrec-synth.json`` matches ``spec``."""
    folder = Path(folder)
    marker = folder / "imgrec-synth.json"
    if marker.is_file():
        written = json.loads(marker.read_text())
        if all(written.get(k) == v for k, v in vars(spec).items()):
            return folder
        shutil.rmtree(folder)
    if console:
        console.print(f"writing the demo dataset to {folder} ...", highlight=False)
    write_synth_dataset(folder, spec)
    return folder


def run_demo(
    out: str | os.PathLike = "runs/demo", *, epochs: int | None = None, spec: SynthSpec = DEMO_DATA, console: Console | None = None
) -> Path:
    """Run the demo into ``out``; returns the path of the HTML report. ``spec`` and ``epochs`` shrink it for tests."""
    from imgrec.engine.evaluate import evaluate
    from imgrec.engine.tasks.classify import train
    from imgrec.inference.predict import load
    from imgrec.report import write_report

    console = console or Console(soft_wrap=True)
    started = time.perf_counter()
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "data" / "imgrec-synth.json").is_file():
        raise ValueError(f"{out} is not empty and holds no earlier demo: the demo replaces the run files in it; pick another --out")
    data = demo_dataset(out / "data", spec, console=console)
    for name in RUN_FILES:  # a fresh run each time; the dataset stays cached
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    recipe = {**DEMO_RECIPE, **({"epochs": epochs} if epochs else {})}
    run = train(data=str(data), out=str(out), console=console, **recipe)

    metrics = evaluate(run, data / "val", json_path=run / "eval.json", confusion_png=run / "confusion.png", reliability_png=run / "reliability.png")
    classifier = load(run)
    samples = demo_samples(data / "val", per_class=2)
    predictions = classifier.predict([path for path, _ in samples], topk=3)
    shown = [{"image": p.source, "true": true, "pred": p.label, "prob": p.prob} for p, (_, true) in zip(predictions, samples)]
    mistakes = confident_mistakes(classifier, data / "val", run / "explain")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = time.perf_counter() - started
    summary = {
        "model": f"{recipe['model']} ({sum(p.numel() for p in classifier.model.parameters()) / 1e6:.2f} M parameters)",
        "data": f"{data}: {spec.classes} classes, {spec.train_per_class} train / {spec.val_per_class} val images each",
        "recipe": f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, AdamW lr {recipe['lr']}, {recipe['data_config']['img_size']} px",
        "device": f"{classifier.device} ({metrics['precision']})",
        "total time": f"{seconds:.0f} s",
    }
    report = write_report(run / "report.html", title=f"imgrec demo: {recipe['model']} on synthetic shapes", history=history, metrics=metrics, predictions=shown, summary=summary, mistakes=mistakes)
    console.print(
        f"demo done in {seconds:.0f} s: val top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%. Report: {report}",
        style="bold green",
        highlight=False,
    )
    return report


def confident_mistakes(classifier: Any, val_dir: Path, out: Path, count: int = 8) -> list[dict[str, Any]]:
    """The ``count`` wrong answers on ``val_dir`` the classifier was surest of, each with its
    Grad-CAM heatmap written to ``out`` (the report's "most confident mistakes")."""
    from imgrec.inference.explain import explain_files

    truth = dict(demo_samples(val_dir, per_class=None))
    wrong = [p for p in classifier.predict(list(truth)) if p.error is None and p.label != truth[p.source]]
    wrong = sorted(wrong, key=lambda p: -p.prob)[:count]
    heatmaps = {row["source"]: row["heatmap"] for row in explain_files(classifier, [p.source for p in wrong], out, [p.label for p in wrong]) if "heatmap" in row}
    return [{"image": p.source, "heatmap": heatmaps.get(p.source), "true": truth[p.source], "pred": p.label, "prob": p.prob} for p in wrong]


def demo_samples(val_dir: Path, per_class: int | None) -> list[tuple[str, str]]:
    """The first ``per_class`` (None: all) images of each class folder, as (path, class name)."""
    from imgrec.data.folder import find_classes, iter_image_files

    return [(str(f), name) for name in find_classes(val_dir) for f in iter_image_files(val_dir / name)[:per_class]]


__all__ = ["DEMO_DATA", "DEMO_RECIPE", "demo_dataset", "run_demo"]
