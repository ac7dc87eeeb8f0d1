"""``imgrec evaluate`` (a model directory on labelled images) and ``imgrec probe`` (a frozen
backbone's features under kNN or a linear classifier)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from imgrec.cli.common import add_config_flags, bounded, console, given
from imgrec.config import LOADERS, PRECISIONS, PREPROCESSING, DataConfig


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion matrix of a trained model")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("--data", required=True, help="ImageFolder of labelled images (or a dataset root: its val/), or a flat folder with --labels")
    p.add_argument("--labels", help="labels of a flat folder: CSV 'filename,class' or ILSVRC's ground-truth list (1-based ids, sorted files)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--confusion", metavar="PNG", help="confusion matrix image (default RUN/confusion.png)")
    p.add_argument("--max-bad-fraction", type=bounded(float, "[0, 1]"), default=0.01, help="unreadable files allowed (left out and listed), default 1%%")
    add_inference_flags(p, batch_size=64)
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None)
    p.add_argument("--loader", choices=LOADERS, default="fast", help="eval pipeline: decode-and-crop (fast) or torchvision's (standard)")
    p.set_defaults(handler=run_evaluate)

    p = commands.add_parser("probe", help="kNN or linear-probe accuracy of a frozen backbone's features (features cached on disk)")
    p.add_argument("backbone", metavar="RUN_OR_WEIGHTS", help="a pretrain or train run directory, a weights file (with --model), or random:ARCH")
    p.add_argument("--data", required=True, help="dataset root holding train/ (the probe learns there) and val/ (scored there)")
    p.add_argument("--method", choices=["knn", "linear"], default="knn", help="weighted kNN (default) or a linear softmax classifier")
    p.add_argument("--model", help="architecture of a bare weights file")
    p.add_argument("--k", type=bounded(int, "[1, inf)"), default=20, help="kNN: neighbours")
    p.add_argument("--temperature", type=bounded(float, "(0, inf)"), default=0.07, help="kNN: vote weight exp(cosine / T)")
    p.add_argument("--epochs", type=bounded(int, "[1, inf)"), default=100, help="linear: passes over the cached features")
    p.add_argument("--lr", type=bounded(float, "(0, inf)"), default=1e-3, help="linear: AdamW learning rate")
    p.add_argument("--weight-decay", type=bounded(float, "[0, inf)"), default=1e-4, help="linear: AdamW weight decay")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the result as JSON (keys top1, top5, ...)")
    p.add_argument("--cache-dir", help="feature cache folder (default $IMGREC_CACHE/features or ~/.cache/imgrec/features)")
    p.add_argument("--no-cache", action="store_true", help="extract features afresh and keep none")
    add_inference_flags(p, batch_size=256)
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None)
    p.add_argument("--loader", choices=LOADERS, default="fast")
    p.add_argument("--seed", type=bounded(int, "[0, 4294967295]"), default=0, help="random:ARCH's initialisation and the linear probe's batches")
    add_config_flags(p, DataConfig, only=(*PREPROCESSING, "max_pixels"))
    p.set_defaults(handler=run_probe)


def add_inference_flags(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument("--batch-size", type=bounded(int, "[1, inf)"), default=batch_size)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the hardware has it")


def run_evaluate(args: argparse.Namespace) -> int:
    from imgrec.engine.evaluate import evaluate

    confusion = args.confusion or str(Path(args.run) / "confusion.png")
    metrics = evaluate(
        args.run, args.data, labels=args.labels, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, json_path=args.json_path, confusion_png=confusion, max_bad_fraction=args.max_bad_fraction,
        loader=args.loader, console=console,
    )  # fmt: skip
    print_metrics(metrics)
    console.print(f"confusion matrix: {confusion}" + (f"; metrics: {args.json_path}" if args.json_path else ""), highlight=False)
    return 0


def print_metrics(metrics: dict) -> None:
    per_class = Table(title="per class", title_justify="left")
    for name in ("class", "images", "top-1 (recall) %", "precision %", "F1 %"):
        per_class.add_column(name, justify="left" if name == "class" else "right")
    for row in metrics["per_class"]:
        per_class.add_row(row["class"], str(row["n"]), *("-" if row.get(k) is None else f"{row[k]:.2f}" for k in ("top1", "precision", "f1")))
    console.print(per_class)
    for skipped in metrics.get("skipped", []):
        console.print(f"skipped {skipped['path']}: {skipped['reason']}", style="yellow", highlight=False)
    console.print(
        f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  balanced accuracy {metrics['balanced_accuracy']:.2f}%  "
        f"macro F1 {metrics['macro_f1']:.2f}%  loss {metrics['loss']:.4f}  "
        f"{metrics['n']} images  {metrics['images_per_s']:.1f} images/s",
        style="bold",
        highlight=False,
    )


def run_probe(args: argparse.Namespace) -> int:
    from imgrec.engine.probe import probe
    from imgrec.utils import write_json

    cache = False if args.no_cache else (args.cache_dir or True)
    result = probe(
        args.backbone, args.data, method=args.method, model=args.model, k=args.k, temperature=args.temperature, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, loader=args.loader, seed=args.seed, cache=cache, console=console,
        data_config={k: v for k, v in given(args, DataConfig, only=(*PREPROCESSING, "max_pixels")).items() if v is not None},
    )  # fmt: skip
    console.print(
        f"{result['method']} probe of {result['backbone']} ({result['architecture']}, {result['feature_dim']}-d): "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['val_images']} val images "
        f"({result['train_images']} train images; classifier {result['classifier_seconds']:.1f} s)",
        highlight=False,
    )
    if args.json_path:
        write_json(args.json_path, result)
    return 0


__all__ = ["add_parsers"]
