"""``imgrec demo``: the whole path on a CPU in a few minutes (``imgrec.demo``)."""

from __future__ import annotations

import argparse

from imgrec.cli.common import bounded, console


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="synthetic dataset -> train -> evaluate -> predict -> HTML report, in a few minutes on a CPU")
    p.add_argument("--out", default="runs/demo", help="run directory (the dataset is cached in OUT/data)")
    p.add_argument("--epochs", type=bounded(int, "[1, inf)"), default=None, help="override the demo recipe's epochs")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from imgrec.demo import run_demo as demo

    demo(args.out, epochs=args.epochs, console=console)
    return 0


__all__ = ["add_parsers"]
