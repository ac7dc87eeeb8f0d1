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
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (DatasetError, FileNotFoundError, IndexError, ValueError) as exc:
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
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(run=run_synth)

    p = commands.add_parser("verify", help="decode every image below a folder and report the bad ones")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest allowed width*height (default 89,478,485)")
    p.set_defaults(run=run_verify)

    p = commands.add_parser("inspect", help="show one sample after each transform step; write a grid of augmented samples")
    p.add_argument("root", help="a train/val dataset root or an ImageFolder root")
    p.add_argument("--model", default=None, help="take size, crop_pct, interpolation, mean and std from this timm model")
    add_data_flags(p)
    p.add_argument("--index", type=int, default=0, help="which image to walk through the pipeline")
    p.add_argument("--samples", type=int, default=16, help="augmented samples in the grid")
    p.add_argument("--out", default="inspect.png", help="where to write the grid PNG")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_inspect)

    p = commands.add_parser("models", help="list timm architectures with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob or substring, e.g. 'resnet*' or convnext")
    p.add_argument("--params", action=argparse.BooleanOptionalAction, default=None, help="count parameters (default: when 100 or fewer match)")
    p.set_defaults(run=run_models)
    return parser


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Preprocessing and augmentation flags; each left unset keeps the model's or the default value."""
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None)
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="RandomResizedCrop area range")
    p.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="RandomResizedCrop aspect range")
    p.add_argument("--hflip", type=float, default=None, help="horizontal flip probability")
    p.add_argument("--auto-augment", default=None, help="'trivial' or 'rand-m9-n2'")
    p.add_argument("--rotation", type=float, default=None, help="max rotation in degrees")
    p.add_argument("--random-erasing", type=float, default=None, help="probability")
    p.add_argument("--max-pixels", type=int, default=None)


def data_config_from_args(args: argparse.Namespace):
    from imgrec.data.transforms import resolve_data_config

    model = None
    if args.model:
        from imgrec.models.factory import create_model

        model = create_model(args.model, num_classes=0)
    names = ("img_size", "crop_pct", "interpolation", "mean", "std", "scale", "ratio", "hflip", "auto_augment", "rotation", "random_erasing", "max_pixels")
    return resolve_data_config(model, **{n: getattr(args, n) for n in names})


def run_synth(args: argparse.Namespace) -> int:
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    spec = SynthSpec(classes=args.classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed)
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


if __name__ == "__main__":
    sys.exit(main())
