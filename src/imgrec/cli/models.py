"""``imgrec models``: the timm architectures by name, with parameter counts; ``imgrec weights``:
timm's pretrained weights by name, listed (offline) and fetched into the Hugging Face Hub's cache."""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from imgrec.cli.common import console


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("models", help="list timm architectures with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob or substring, e.g. 'resnet*' or convnext")
    p.add_argument("--params", action=argparse.BooleanOptionalAction, default=None, help="count parameters (default: when 100 or fewer match)")
    p.set_defaults(handler=run_models)
    weights = commands.add_parser("weights", help="list pretrained weights by name, fetch them into the hub cache").add_subparsers(title="commands", metavar="COMMAND")
    p = weights.add_parser("list", help="timm's pretrained tags matching PATTERN, marking those in the local hub cache (no network)")
    p.add_argument("pattern", nargs="?", default="*", help="glob or substring, e.g. 'resnet50.*' or convnext_tiny")
    p.add_argument("--cached", action="store_true", help="only those in the local cache")
    p.set_defaults(handler=run_weights_list)
    p = weights.add_parser("fetch", help="download weights by name into the hub cache (HF_HOME), e.g. ahead of an offline run")
    p.add_argument("names", nargs="+", metavar="NAME", help="a timm tag (resnet50.a1_in1k), a bare architecture (its default tag) or hf-hub:ORG/REPO")
    p.set_defaults(handler=run_weights_fetch)


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


def run_weights_list(args: argparse.Namespace) -> int:
    from imgrec.models.hub import list_weights

    tags = [t for t in list_weights(args.pattern) if t.cached or not args.cached]
    if not tags:
        print(f"no pretrained weights match {args.pattern!r}" + (" in the local cache" if args.cached else ""), file=sys.stderr)
        return 1
    table = Table(title=f"{len(tags)} pretrained weights ({sum(t.cached for t in tags)} in the local hub cache)", title_justify="left")
    table.add_column("name")
    table.add_column("hub repository")
    table.add_column("cached", justify="center")
    for tag in tags:
        table.add_row(tag.name, tag.repo or "- (a URL)", "yes" if tag.cached else "")
    console.print(table)
    return 0


def run_weights_fetch(args: argparse.Namespace) -> int:
    from imgrec.models.hub import fetch_weights

    for name in args.names:
        found = fetch_weights(name)
        console.print(f"{found.name}: {found.repo}@{found.revision[:12]} {found.path} (sha256 {found.sha256[:16]}...)", highlight=False)
    return 0


__all__ = ["add_parsers"]
