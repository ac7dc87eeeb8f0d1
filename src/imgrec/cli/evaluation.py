"""``imgrec evaluate`` (a model directory on labelled images), ``imgrec calibrate`` (its
temperature, fitted on held-out images) and ``imgrec probe`` (a frozen backbone's features under
kNN or a linear classifier)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from imgrec.cli.common import add_config_flags, add_tta_flag, bounded, console, given
from imgrec.config import LOADERS, PRECISIONS, PREPROCESSING, DataConfig


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion matrix of a trained model")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("--data", required=True, help="ImageFolder of labelled images (or a dataset root: its val/), or a flat folder with --labels")
    p.add_argument("--labels", help="labels of a flat folder: CSV 'filename,class' or ILSVRC's ground-truth list (1-based ids, sorted files)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--confusion", metavar="PNG", help="confusion matrix image (default RUN/confusion.png)")
    p.add_argument("--reliability", metavar="PNG", help="reliability diagram: accuracy against confidence (default RUN/reliability.png)")
    p.add_argument("--groups", metavar="CSV", help="filename,group lines (any attribute: site, device, age band...): top-1, ECE and per-class recall of each group and the largest gaps between them")
    add_labelled_data_flags(p)
    add_tta_flag(p)
    p.set_defaults(handler=run_evaluate)

    p = commands.add_parser("calibrate", help="fit a temperature on held-out images so that the model's probabilities match how often it is right; stored in model.json")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("--data", required=True, help="labelled images the model was not trained on: a val folder, or the dataset root (its val/ or the run's recorded split)")
    p.add_argument("--labels", help="labels of a flat folder: CSV 'filename,class' or ILSVRC's ground-truth list")
    p.add_argument("--dry-run", action="store_true", help="fit and print, but leave model.json as it is")
    add_labelled_data_flags(p)
    add_tta_flag(p)
    p.set_defaults(handler=run_calibrate)

    p = commands.add_parser("probe", help="kNN or linear-probe accuracy of a frozen backbone's features (features cached on disk)")
    p.add_argument("backbone", metavar="RUN_OR_WEIGHTS", help="a pretrain or train run directory, a weights file (with --model), or random:ARCH")
    p.add_argument("--data", required=True, help="dataset root holding train/ (the probe learns there) and val/ (scored there)")
    p.add_argument("--method", choices=["knn", "linear"], default="knn", help="weighted kNN (default) or a linear softmax classifier")
    p.add_argument("--model", help="architecture of a bare weights file")
    p.add_argument("--k", type=bounded(int, "[1, inf)"), default=20, help="kNN: neighbours")
    p.add_argument("--temperature", type=bounded(float, "(0, inf)"), default=0.07, help="kNN: vote weight exp(cosine / T)")
    p.add_argument("--epochs", type=bounded(int, "[1, inf)"), default=100, help="linear: passes over the cached features")
    p.add_argument("--lr", type=bounded(float, "(0, inf)"), default=None, help="linear: AdamW learning rate (default: the best of 1e-3, 3e-3, 1e-2, 3e-2 on a held-out fifth of train/)")
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


def add_labelled_data_flags(p: argparse.ArgumentParser) -> None:
    """What evaluate and calibrate share about reading labelled images and running the model."""
    p.add_argument("--max-bad-fraction", type=bounded(float, "[0, 1]"), default=0.01, help="unreadable files allowed (left out and listed), default 1%%")
    add_inference_flags(p, batch_size=64)
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None)
    p.add_argument("--loader", choices=LOADERS, default="fast", help="eval pipeline: decode-and-crop (fast) or torchvision's (standard)")


def add_inference_flags(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument("--batch-size", type=bounded(int, "[1, inf)"), default=batch_size)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the hardware has it")


def run_evaluate(args: argparse.Namespace) -> int:
    from imgrec.engine.evaluate import evaluate

    confusion = args.confusion or str(Path(args.run) / "confusion.png")
    reliability = args.reliability or str(Path(args.run) / "reliability.png")
    metrics = evaluate(
        args.run, args.data, labels=args.labels, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, json_path=args.json_path, confusion_png=confusion, reliability_png=reliability,
        max_bad_fraction=args.max_bad_fraction, loader=args.loader, tta=args.tta, groups=args.groups, console=console,
    )  # fmt: skip
    print_metrics(metrics)
    if "fairness" in metrics:
        print_groups(metrics["fairness"])
    console.print(f"confusion matrix: {confusion}; reliability diagram: {reliability}" + (f"; metrics: {args.json_path}" if args.json_path else ""), highlight=False)
    return 0


def print_groups(fairness: dict) -> None:
    table = Table(title=f"per group ({fairness['file']})", title_justify="left")
    for name in ("group", "images", "top-1 %", "ECE %", "lowest class recall %"):
        table.add_column(name, justify="left" if name == "group" else "right")
    for row in fairness["groups"]:
        worst = min(row["recall"].items(), key=lambda kv: kv[1]) if row["recall"] else ("-", None)
        table.add_row(row["group"], str(row["n"]), f"{row['top1']:.2f}", f"{row['ece']:.2f}", "-" if worst[1] is None else f"{worst[1]:.2f} ({worst[0]})")
    console.print(table)
    gaps = fairness["gaps"]
    if gaps:
        line = f"largest gaps between groups: top-1 {gaps['top1']['gap']:.2f} points ({gaps['top1']['highest']} over {gaps['top1']['lowest']}), ECE {gaps['ece']['gap']:.2f} points"
        if gaps.get("recall"):
            r = gaps["recall"]
            line += f", recall of {r['class']} {r['gap']:.2f} points ({r['highest']} over {r['lowest']})"
        console.print(line, style="bold", highlight=False)
    if fairness["ungrouped"]:
        console.print(f"{fairness['ungrouped']} image(s) have no group in {fairness['file']}: left out of the groups' figures", style="yellow", highlight=False)


def run_calibrate(args: argparse.Namespace) -> int:
    from imgrec.engine.calibrate import calibrate

    result = calibrate(
        args.run, args.data, labels=args.labels, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, max_bad_fraction=args.max_bad_fraction, loader=args.loader, tta=args.tta, write=not args.dry_run, console=console,
    )  # fmt: skip
    console.print(
        f"temperature {result['temperature']:.4g} fitted on {result['images']} images of {result['data']}: "
        f"ECE {result['ece_before']:.2f}% -> {result['ece_after']:.2f}%, NLL {result['nll_before']:.4f} -> {result['nll_after']:.4f}, "
        f"Brier {result['brier_before']:.4f} -> {result['brier_after']:.4f} (top-1 unchanged)",
        highlight=False,
    )
    console.print(f"stored in {result['card']}: predict, evaluate and serve apply it" if "card" in result else "dry run: model.json left as it was", highlight=False)
    for exported in result.get("exports", []):
        console.print(f"{exported}.json: the card beside the export now has the temperature", highlight=False)
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
    scaled = f" (temperature {metrics['temperature']:.4g})" if metrics.get("temperature") else " (not calibrated: imgrec calibrate)"
    console.print(
        f"calibration{scaled}: ECE {metrics['ece']:.2f}%  NLL {metrics['nll']:.4f}  Brier {metrics['brier']:.4f}",
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
    rate = f", lr {result['lr']:g}" if "lr" in result else ""  # the linear probe's, chosen or given
    console.print(
        f"{result['method']} probe of {result['backbone']} ({result['architecture']}, {result['feature_dim']}-d): "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['val_images']} val images "
        f"({result['train_images']} train images; classifier {result['classifier_seconds']:.1f} s{rate})",
        highlight=False,
    )
    if args.json_path:
        write_json(args.json_path, result)
    return 0


__all__ = ["add_parsers"]
