"""The ``imgrec`` command: one module per command group, each a thin layer over the Python API.

Every command parses its flags (generated from the config dataclasses where there is one,
``common.add_config_flags``), calls one API function and prints. No logic lives here, and
nothing in the package imports the CLI. Building the parser imports no torch, so ``imgrec
--help`` and each command's ``--help`` answer at once; a command imports what it runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import NoReturn

from imgrec.cli import data, demo, deploy, evaluation, models, training
from imgrec.cli.common import console

GROUPS = (data, models, training, evaluation, deploy, demo)  # in the order --help lists their commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (OSError, ValueError, FloatingPointError) as exc:  # a user's mistake or the machine's limit: a message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The ``imgrec`` command: ``main``, then the exit without the interpreter's last collection.

    The objects left at the end (torch's, timm's, the run's) are moved out of the cyclic garbage
    collector's reach (``gc.freeze``) before Python shuts down: the shutdown still closes files and
    runs every exit handler, but no longer walks millions of objects the process is about to hand
    back to the system anyway (1.1 s of every command after importing torch and timm, measured:
    BENCHMARKS.md, "Time to accuracy")."""
    code = main()
    gc.freeze()
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgrec", description="ImageNet-style image recognition, from folders of images to a served classifier.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(commands)
    return parser


__all__ = ["build_parser", "console", "main", "run"]
