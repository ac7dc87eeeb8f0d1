"""``imgrec models``: the timm architectures by name, with parameter counts."""

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


__all__ = ["add_parsers"]
