"""The ``imgrec`` command: each sub-command parses its flags, calls one API function, prints.

No logic lives here; everything a command does is a function of the Python API.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from imgrec.data.folder import DatasetError

console = Console(soft_wrap=True)  # long paths stay on one line, greppable


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (DatasetError, OSError, IndexError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgrec", description="ImageNet-style image recognition, from folders of images to a served classifier.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = commands.add_parser("synth", help="write the built-in demo dataset (shapes on cluttered backgrounds)")
    p.add_argument("out", help="output folder; gets train/<class>/ and val/<class>/")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=96, help="smallest image side in pixels")
    p.add_argument("--max-side", type=int, default=320, help="largest image side in pixels")
    p.add_argument("--clutter", type=float, default=1.0, help="0-1: amount of background noise, stripes, blobs and lines")
    p.add_argument("--background", type=float, default=1.0, help="0-1: contrast of the background's colour field (0: one flat colour)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(handler=run_synth)

    p = commands.add_parser("verify", help="decode every image below a folder and report the bad ones")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest allowed width*height (default 89,478,485)")
    p.set_defaults(handler=run_verify)

    p = commands.add_parser("inspect", help="show one sample after each transform step; write a grid of augmented samples")
    p.add_argument("root", help="a train/val dataset root or an ImageFolder root")
    p.add_argument("--model", default=None, help="take size, crop_pct, interpolation, mean and std from this timm model")
    add_data_flags(p)
    p.add_argument("--index", type=int, default=0, help="which image to walk through the pipeline")
    p.add_argument("--samples", type=int, default=16, help="augmented samples in the grid")
    p.add_argument("--out", default="inspect.png", help="where to write the grid PNG")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_inspect)

    p = commands.add_parser("models", help="list timm architectures with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob or substring, e.g. 'resnet*' or convnext")
    p.add_argument("--params", action=argparse.BooleanOptionalAction, default=None, help="count parameters (default: when 100 or fewer match)")
    p.set_defaults(handler=run_models)

    p = commands.add_parser("prepare", help="turn downloaded datasets into train/ and val/ folders")
    targets = p.add_subparsers(title="datasets", metavar="DATASET")
    q = targets.add_parser("imagenet", help="ILSVRC-2012 from its raw archives (train tar, val tar, devkit)")
    q.add_argument("--src", required=True, help="folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz")
    q.add_argument("--out", required=True, help="dataset root to write: OUT/train/<wnid>/, OUT/val/<wnid>/, OUT/class_names.json")
    q.set_defaults(handler=run_prepare_imagenet)

    p = commands.add_parser("shards", help="write an ImageFolder as WebDataset tar shards (re-encoded JPEGs + class index)")
    p.add_argument("src", help="an ImageFolder, e.g. DATA/train")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar files and the class index")
    p.add_argument("--max-side", type=int, default=512, help="re-encode images to at most this many pixels on the longer side")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 500MB or 1GB")
    p.add_argument("--classes", help="class index JSON to use (e.g. the train shards' one when writing val)")
    p.add_argument("--workers", type=int, default=None, help="processes re-encoding images (default: all cores)")
    p.set_defaults(handler=run_shards)

    p = commands.add_parser("train", help="train a classifier on DATA/train, validate on DATA/val; writes a model directory")
    add_train_flags(p)
    p.set_defaults(handler=run_train)

    from imgrec.cli_ssl import add_pretrain_parser, add_probe_parser

    add_pretrain_parser(commands)
    add_probe_parser(commands)

    from imgrec.cli_deploy import add_benchmark_parser, add_export_parser, add_serve_parser

    add_export_parser(commands)
    add_benchmark_parser(commands)
    add_serve_parser(commands)

    p = commands.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion matrix of a trained model")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("--data", required=True, help="ImageFolder of labelled images (or a dataset root: its val/), or a flat folder with --labels")
    p.add_argument("--labels", help="labels of a flat folder: CSV 'filename,class' or ILSVRC's ground-truth list (1-based ids, sorted files)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--confusion", metavar="PNG", help="confusion matrix image (default RUN/confusion.png)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="unreadable files allowed (left out and listed), default 1%%")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--loader", choices=["fast", "standard"], default="fast", help="eval pipeline: decode-and-crop (fast) or torchvision's (standard)")
    p.set_defaults(handler=run_evaluate)

    p = commands.add_parser("predict", help="top-k classes of images, folders or globs")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    add_backend_argument(p)
    p.set_defaults(handler=run_predict)

    p = commands.add_parser("demo", help="synthetic dataset -> train -> evaluate -> predict -> HTML report, in a few minutes on a CPU")
    p.add_argument("--out", default="runs/demo", help="run directory (the dataset is cached in OUT/data)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo recipe's epochs")
    p.set_defaults(handler=run_demo)
    return parser


# Flags of every training loop for many processes and faults (DDP, checkpoints, NaN steps).
LOOP_FAULT_FIELDS = ("checkpoint_every", "checkpoint_minutes", "max_bad_steps", "deterministic", "sync_bn")
# Train flags that map one to one to TrainConfig fields (None = not given: the YAML or default wins).
TRAIN_FIELDS = (
    "data", "val_data", "model", "out", "epochs", "batch_size", "accum_steps", "opt", "lr", "base_lr", "weight_decay", "momentum",
    "warmup_epochs", "min_lr", "label_smoothing", "mixup", "cutmix", "clip_grad", "ema_decay", "pretrained",
    "freeze_backbone", "layer_decay", "train_fraction", "drop_path", "precision", "channels_last", "compile", "device", "seed", "workers", "steps_per_epoch",
    "tensorboard", "loader", *LOOP_FAULT_FIELDS,
)  # fmt: skip
DATA_FIELDS = ("img_size", "crop_pct", "interpolation", "mean", "std", "scale", "ratio", "hflip", "auto_augment", "rotation", "random_erasing", "max_pixels")


def add_loop_flags(p: argparse.ArgumentParser, config: str = "TrainConfig") -> None:
    """The flags every training loop takes (train and pretrain): data, model, optimisation, hardware."""
    p.add_argument("--data", help="dataset root holding train/<class>/ and val/<class>/ (or train/ and val/ folders of shards), or a shard pattern/URL")
    p.add_argument("--val-data", help="validation shards, when --data is a shard pattern, pipe: command or URL")
    p.add_argument("--model", help="timm architecture, e.g. resnet50 (`imgrec models` lists them)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--config", help=f"YAML file of {config} fields; flags given here win")
    p.add_argument(
        "--resume", metavar="RUN|auto",
        help="continue RUN from its last.pt (other flags are ignored, except --epochs, --device, --workers); "
        "auto: continue --out if it holds a checkpoint, else start it (for torchrun --max-restarts)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--accum-steps", type=int, help="batches per optimizer step (gradient accumulation)")
    p.add_argument("--lr", type=float, help="learning rate (default: --base-lr x batch x accum / 256)")
    p.add_argument("--base-lr", type=float, help="learning rate per 256 images")
    p.add_argument("--weight-decay", type=float, help="never on biases and norms")
    p.add_argument("--momentum", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where the hardware has it")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="loader processes (default: all cores)")
    p.add_argument("--steps-per-epoch", type=int, help="cap optimizer steps per epoch")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--loader", choices=["fast", "standard"], help="fast (default): decode-and-crop JPEGs at the crop's scale; standard: torchvision's PIL path")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also write last.pt every STEPS optimizer steps (every epoch's end always does)")
    p.add_argument("--checkpoint-minutes", type=float, help="also write last.pt every this many minutes (default 15; 0 = off)")
    p.add_argument("--max-bad-steps", type=int, help="stop after this many steps in a row with a non-finite loss, each skipped (default 10)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None, help="PyTorch's deterministic algorithms: bitwise-reproducible runs and resumes")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None, help="synchronise batch-norm statistics across DDP ranks (GPUs)")
    add_data_flags(p)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    add_loop_flags(p)
    p.add_argument("--opt", choices=["adamw", "sgd"], help="AdamW (default) or SGD with Nesterov momentum; base lr adamw 1e-3, sgd 0.1")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, help="cutmix alpha (0 = off)")
    p.add_argument("--clip-grad", type=float, help="max gradient norm")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights with this decay, e.g. 0.9998")
    p.add_argument("--pretrained", metavar="FILE_OR_RUN", help="start from local weights (.safetensors/.pth) or a run directory (imgrec pretrain: its backbone)")
    p.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=None, help="train only the classifier")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay for fine-tuning, e.g. 0.75: each block gets this factor of the next one's rate")
    p.add_argument("--train-fraction", type=float, help="train on this class-balanced fraction of the train images (0-1], chosen by --seed")
    p.add_argument("--drop-path", type=float)


def config_from_args(args: argparse.Namespace, cls: type, fields: tuple[str, ...]):
    """The ``cls`` config of ``--config`` YAML (if any) with every flag given on the command line on top."""
    import yaml

    from imgrec.config import from_dict

    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{args.config} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of {cls.__name__} fields, e.g. 'epochs: 10'")
    values.update({name: getattr(args, name) for name in fields if getattr(args, name) is not None})
    data_config = dict(values.get("data_config") or {})
    data_config.update({name: getattr(args, name) for name in DATA_FIELDS if getattr(args, name) is not None})
    values["data_config"] = data_config
    return from_dict(cls, values, source=args.config or "flags")


def resume_overrides(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    """The flags a resumed run takes (machine-dependent ones); a note about the others, which it ignores."""
    allowed = ("epochs", "device", "workers")
    ignored = [name for name in fields + DATA_FIELDS if name not in allowed and getattr(args, name) not in (None, False)]
    if ignored or args.config:
        names = ", ".join("--" + n.replace("_", "-") for n in ignored + (["config"] if args.config else []))
        console.print(f"note: --resume continues the run's own config; ignoring {names}", style="yellow", highlight=False)
    return {name: getattr(args, name) for name in allowed if getattr(args, name) is not None}


def run_train(args: argparse.Namespace) -> int:
    from imgrec.config import TrainConfig
    from imgrec.engine.train import train

    return run_loop(train, args, TrainConfig, TRAIN_FIELDS)


def train_config_from_args(args: argparse.Namespace):
    from imgrec.config import TrainConfig

    return config_from_args(args, TrainConfig, TRAIN_FIELDS)


def run_loop(loop, args: argparse.Namespace, cls: type, fields: tuple[str, ...]) -> int:
    """Start, resume (--resume RUN) or start-or-resume (--resume auto) a training loop; a run stopped
    by SIGTERM/SIGINT after its checkpoint exits with 128 + the signal's number, as shells expect."""
    from imgrec.engine.resume import TrainingInterrupted

    try:
        if args.resume and args.resume != "auto":  # machine-dependent settings may change on resume; the recipe stays the run's own
            loop(resume=args.resume, console=console, **resume_overrides(args, fields))
        else:
            loop(config_from_args(args, cls, fields), resume=args.resume, console=console)
    except TrainingInterrupted as exc:
        console.print(str(exc), style="yellow", highlight=False)
        return 128 + exc.signum
    return 0


def add_preprocessing_flags(p: argparse.ArgumentParser) -> None:
    """How an image becomes the model's input at inference; each left unset keeps the weights' or model's value."""
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None)
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--max-pixels", type=int, default=None)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Preprocessing and augmentation flags; each left unset keeps the model's or the default value."""
    add_preprocessing_flags(p)
    p.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="RandomResizedCrop area range")
    p.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="RandomResizedCrop aspect range")
    p.add_argument("--hflip", type=float, default=None, help="horizontal flip probability")
    p.add_argument("--auto-augment", default=None, help="'trivial' or 'rand-m9-n2'")
    p.add_argument("--rotation", type=float, default=None, help="max rotation in degrees")
    p.add_argument("--random-erasing", type=float, default=None, help="probability")


def data_config_from_args(args: argparse.Namespace):
    from imgrec.data.transforms import resolve_data_config

    model = None
    if args.model:
        from imgrec.models.factory import create_model

        model = create_model(args.model, num_classes=0)
    return resolve_data_config(model, **{n: getattr(args, n) for n in DATA_FIELDS})


def run_synth(args: argparse.Namespace) -> int:
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    spec = SynthSpec(
        classes=args.classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed,
        min_side=args.min_side, max_side=args.max_side, clutter=args.clutter, background=args.background,
    )  # fmt: skip
    start = time.perf_counter()
    out = write_synth_dataset(args.out, spec, workers=args.workers)
    total = spec.classes * (spec.train_per_class + spec.val_per_class)
    console.print(f"wrote {total} images in {spec.classes} classes to {out}/train and {out}/val in {time.perf_counter() - start:.1f} s")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from imgrec.data.verify import verify_folder

    options = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    report = verify_folder(args.root, workers=args.workers, **options)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 1 if report.bad else 0
    if report.bad:
        table = Table(title=f"{len(report.bad)} bad file(s)", title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for f in report.bad:
            table.add_row(f.path, f.reason)
        console.print(table)
    groups = Table(title="per class", title_justify="left")
    for name in ("class", "files", "bad"):
        groups.add_column(name, justify="left" if name == "class" else "right")
    for group, (n, bad) in report.per_group().items():
        groups.add_row(group, str(n), str(bad))
    console.print(groups)
    formats = ", ".join(f"{fmt} {n}" for fmt, n in report.per_format().items()) or "none"
    console.print(f"formats: {formats}")
    if size := report.size_range():
        console.print(f"sizes: width {size['width'][0]}-{size['width'][1]} px, height {size['height'][0]}-{size['height'][1]} px")
    for f in report.misnamed:
        console.print(f"note: {f.path} is {f.format} despite its extension (read correctly)", highlight=False)
    console.print(f"{len(report.files)} files checked, {len(report.bad)} bad", style="bold red" if report.bad else "bold green")
    return 1 if report.bad else 0


def run_inspect(args: argparse.Namespace) -> int:
    from imgrec.data.inspect import inspect_pipeline

    config = data_config_from_args(args)
    report = inspect_pipeline(args.root, config, index=args.index, samples=args.samples, out=args.out, seed=args.seed)
    console.print(f"sample: {report.path} (class {report.label})", highlight=False)
    console.print(
        f"config: img_size {config.img_size}, crop_pct {config.crop_pct}, {config.interpolation}, "
        f"mean {tuple(round(m, 3) for m in config.mean)}, std {tuple(round(s, 3) for s in config.std)}",
        highlight=False,
    )
    table = Table()
    for name in ("pipeline", "step", "output"):
        table.add_column(name)
    for step in report.steps:
        table.add_row(step.pipeline, step.step, step.output)
    console.print(table)
    if report.grid:
        console.print(f"wrote {args.samples} augmented train samples to {report.grid}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from imgrec.models.factory import list_architectures

    infos = list_architectures(args.pattern, with_params=args.params)
    if not infos:
        print(f"no architecture matches {args.pattern!r}", file=sys.stderr)
        return 1
    table = Table(title=f"{len(infos)} architectures", title_justify="left")
    table.add_column("model")
    table.add_column("params (M)", justify="right")
    for info in infos:
        table.add_row(info.name, f"{info.params / 1e6:.2f}" if info.params >= 0 else "-")
    console.print(table)
    if len(infos) > 100 and args.params is None:
        console.print("parameter counts are left out when over 100 architectures match: narrow the pattern or pass --params")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imgrec.engine.evaluate import evaluate

    confusion = args.confusion or str(Path(args.run) / "confusion.png")
    metrics = evaluate(
        args.run, args.data, labels=args.labels, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, json_path=args.json_path, confusion_png=confusion, max_bad_fraction=args.max_bad_fraction,
        loader=args.loader,
    )  # fmt: skip
    print_metrics(metrics)
    console.print(f"confusion matrix: {confusion}" + (f"; metrics: {args.json_path}" if args.json_path else ""), highlight=False)
    return 0


def print_metrics(metrics: dict) -> None:
    per_class = Table(title="per class", title_justify="left")
    for name in ("class", "images", "top-1 %"):
        per_class.add_column(name, justify="left" if name == "class" else "right")
    for row in metrics["per_class"]:
        per_class.add_row(row["class"], str(row["n"]), "-" if row["top1"] is None else f"{row['top1']:.2f}")
    console.print(per_class)
    for skipped in metrics.get("skipped", []):
        console.print(f"skipped {skipped['path']}: {skipped['reason']}", style="yellow", highlight=False)
    console.print(
        f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
        f"{metrics['n']} images  {metrics['images_per_s']:.1f} images/s",
        style="bold",
        highlight=False,
    )


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    from imgrec.runtime import BACKENDS

    p.add_argument(
        "--backend", choices=["auto", *BACKENDS], default="auto",
        help="what runs the network; auto: the fastest that `imgrec benchmark RUN` recorded with >= 99%% agreement, else PyTorch at --precision",
    )  # fmt: skip


def run_predict(args: argparse.Namespace) -> int:
    import csv

    from imgrec.predict import load

    classifier = load(args.run, device=args.device, precision=args.precision, backend=args.backend)
    print(f"backend: {classifier.backend} ({classifier.backend_reason})", file=sys.stderr)
    predictions = classifier.predict(args.paths, topk=args.topk, batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["source", "rank", "class", "prob", "error"])
        for p in predictions:
            if p.error is not None:
                writer.writerow([p.source, "", "", "", p.error])
            for rank, (label, prob) in enumerate(zip(p.labels, p.probs), start=1):
                writer.writerow([p.source, rank, label, f"{prob:.6f}", ""])
    else:
        table = Table()
        table.add_column("image", overflow="fold")
        table.add_column("class")
        table.add_column("prob", justify="right")
        table.add_column(f"top-{args.topk}", overflow="fold")
        for p in predictions:
            if p.error is not None:
                table.add_row(p.source, "[red]error[/red]", "", p.error)
            else:
                shown = [f"{c} ({n})" for c, n in zip(p.labels, p.names)] if p.names else p.labels
                others = ", ".join(f"{c} {q:.2f}" for c, q in zip(shown[1:], p.probs[1:]))
                table.add_row(p.source, shown[0], f"{p.prob:.3f}", others)
        console.print(table)
    failed = sum(p.error is not None for p in predictions)
    if failed:
        print(f"{failed} of {len(predictions)} input(s) could not be predicted", file=sys.stderr)
    return 0 if failed < len(predictions) else 1


def run_prepare_imagenet(args: argparse.Namespace) -> int:
    from imgrec.data.prepare import prepare_imagenet

    prepare_imagenet(args.src, args.out, console=console)
    return 0


def run_shards(args: argparse.Namespace) -> int:
    from imgrec.data.shard_writer import parse_size, write_shards

    write_shards(
        args.src, args.out, max_side=args.max_side, quality=args.quality, shard_size=parse_size(args.shard_size),
        classes=args.classes, workers=args.workers, console=console,
    )  # fmt: skip
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from imgrec.demo import run_demo as demo

    demo(args.out, epochs=args.epochs, console=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
