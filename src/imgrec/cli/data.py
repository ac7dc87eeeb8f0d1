"""The data commands: ``imgrec synth``, ``verify``, ``inspect``, ``prepare`` and ``shards``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.table import Table

from imgrec.cli.common import add_config_flags, bounded, console, given
from imgrec.config import DataConfig
from imgrec.data.synth import SynthSpec


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("synth", help="write the built-in demo dataset (shapes on cluttered backgrounds)")
    p.add_argument("out", help="output folder; gets train/<class>/ and val/<class>/")
    add_config_flags(p, SynthSpec)
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None, help="processes (default: all cores)")
    p.set_defaults(handler=run_synth)

    p = commands.add_parser("verify", help="decode every image below a folder and report the bad ones")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None, help="processes (default: all cores)")
    p.add_argument("--duplicates", action="store_true", help="also find exact and near copies (resized, re-encoded) inside a split and across train/val/test: the leakage that inflates val figures")
    p.add_argument("--dedup-list", metavar="FILE", help="with --duplicates: write the files to keep (relative to ROOT, one a line), each group's copies but one left out, train's copy kept")
    add_config_flags(p, DataConfig, only=("max_pixels",))
    p.set_defaults(handler=run_verify)

    p = commands.add_parser("inspect", help="show one sample after each transform step; write a grid of augmented samples")
    p.add_argument("root", help="a train/val dataset root or an ImageFolder root")
    p.add_argument("--model", default=None, help="take size, crop_pct, interpolation, mean and std from this timm model")
    add_config_flags(p, DataConfig)
    p.add_argument("--index", type=bounded(int, "[0, inf)"), default=0, help="which image to walk through the pipeline")
    p.add_argument("--samples", type=bounded(int, "[0, inf)"), default=16, help="augmented samples in the grid")
    p.add_argument("--out", default="inspect.png", help="where to write the grid PNG")
    p.add_argument("--seed", type=bounded(int, "[0, 4294967295]"), default=0)
    p.set_defaults(handler=run_inspect)

    p = commands.add_parser("prepare", help="turn downloaded datasets into train/ and val/ folders")
    targets = p.add_subparsers(title="datasets", metavar="DATASET")
    q = targets.add_parser("imagenet", help="ILSVRC-2012 from its raw archives (train tar, val tar, devkit)")
    q.add_argument("--src", required=True, help="folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz")
    q.add_argument("--out", required=True, help="dataset root to write: OUT/train/<wnid>/, OUT/val/<wnid>/, OUT/class_names.json")
    q.set_defaults(handler=run_prepare_imagenet)

    p = commands.add_parser("shards", help="write an ImageFolder as WebDataset tar shards (re-encoded JPEGs + class index)")
    p.add_argument("src", help="an ImageFolder, e.g. DATA/train")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar files and the class index")
    p.add_argument("--max-side", type=bounded(int, "[1, inf)"), default=512, help="re-encode images to at most this many pixels on the longer side")
    p.add_argument("--quality", type=bounded(int, "[1, 100]"), default=90, help="JPEG quality of the re-encoded images")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 500MB or 1GB")
    p.add_argument("--classes", help="class index JSON to use (e.g. the train shards' one when writing val)")
    p.add_argument("--workers", type=bounded(int, "[0, inf)"), default=None, help="processes re-encoding images (default: all cores)")
    p.set_defaults(handler=run_shards)


def run_synth(args: argparse.Namespace) -> int:
    from imgrec.data.synth import write_synth_dataset

    spec = SynthSpec(**{name: value for name, value in given(args, SynthSpec).items() if value is not None})
    start = time.perf_counter()
    out = write_synth_dataset(args.out, spec, workers=args.workers)
    total = spec.classes * (spec.train_per_class + spec.val_per_class)
    console.print(f"wrote {total} images in {spec.classes} classes to {out}/train and {out}/val in {time.perf_counter() - start:.1f} s")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from imgrec.data.verify import verify_folder

    if args.dedup_list and not args.duplicates:
        raise ValueError("--dedup-list needs --duplicates: the list leaves out the copies that finds")
    options = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    report = verify_folder(args.root, workers=args.workers, duplicates=args.duplicates, console=console, **options)
    if args.dedup_list:
        write_dedup_list(report, args.root, args.dedup_list)
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
    if report.duplicates is not None:
        print_duplicates(report.duplicates, args.root)
    console.print(f"{len(report.files)} files checked, {len(report.bad)} bad", style="bold red" if report.bad else "bold green")
    if args.dedup_list:
        console.print(f"deduplicated file list: {args.dedup_list} ({len(report.good) - len(report.duplicates.redundant())} files)", highlight=False)
    return 1 if report.bad else 0


def print_duplicates(found, root: str, shown: int = 20) -> None:
    """The groups of copies, those across splits (leakage) first, at most ``shown`` of them."""
    across, within = found.across, found.within
    style = "bold red" if across else ("yellow" if within else "bold green")
    console.print(f"duplicates: {len(across)} group(s) across splits (the same image trained on and scored), {len(within)} inside a split", style=style, highlight=False)
    for group in found.groups[:shown]:
        kind = "exact" if group.exact else f"near (thumbnails {group.cosine:.3f} alike)"
        where = "across " + "/".join(sorted(set(group.splits))) if group.across_splits else "in " + group.splits[0]
        console.print(f"  {kind}, {where}: " + ", ".join(str(Path(f).relative_to(root)) for f in group.files), highlight=False)
    if len(found.groups) > shown:
        console.print(f"  ... and {len(found.groups) - shown} more (--json lists them all)", highlight=False)


def write_dedup_list(report, root: str, out: str) -> None:
    """The readable files but the redundant copies, relative to ``root``, one a line."""
    dropped = set(report.duplicates.redundant())
    kept = [str(Path(f.path).relative_to(root)) for f in report.good if f.path not in dropped]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The data flags over ``--model``'s preprocessing (or the defaults)."""
    from imgrec.recipe import resolve_data_config

    model = None
    if args.model:
        from imgrec.models.factory import create_model

        model = create_model(args.model, num_classes=0)
    return resolve_data_config(model, **given(args, DataConfig))


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


__all__ = ["add_parsers", "data_config_from_args"]
