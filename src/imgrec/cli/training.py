"""``imgrec train`` and ``imgrec pretrain``: flags from ``TrainConfig`` / ``PretrainConfig`` and
``DataConfig``, merged with a YAML recipe (``imgrec.recipe.load_config``), then one call of
``imgrec.train`` / ``imgrec.pretrain``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from imgrec.cli.common import add_config_flags, console, given
from imgrec.config import DataConfig, LoopConfig, PretrainConfig, TrainConfig
from imgrec.engine.tasks import METHODS

# The settings a resumed run takes from the command line (they depend on the machine); the recipe stays the run's own.
RESUME_FLAGS = ("epochs", "device", "workers")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a classifier on DATA/train, validate on DATA/val; writes a model directory")
    add_run_flags(p, TrainConfig)
    p.set_defaults(handler=run_train)
    p = commands.add_parser("lr-find", help="learning-rate range test of a training run: the loss against the rate, and a suggestion (no training)")
    add_config_flags(p, TrainConfig)
    add_config_flags(p, DataConfig)
    p.add_argument("--config", help="YAML file of TrainConfig fields; flags given here win")
    p.set_defaults(handler=run_lr_find, out_default="runs/lr-find")
    p = commands.add_parser("pretrain", help="self-supervised pretraining of a backbone on images without labels; writes RUN/backbone.safetensors")
    add_run_flags(p, PretrainConfig)
    p.set_defaults(handler=run_pretrain)


def add_run_flags(p: argparse.ArgumentParser, cls: type[LoopConfig]) -> None:
    p.add_argument("--config", help=f"YAML file of {cls.__name__} fields; flags given here win")
    p.add_argument(
        "--resume", metavar="RUN|auto",
        help="continue RUN from its last.pt (other flags are ignored, except --epochs, --device, --workers); "
        "auto: continue --out if it holds a checkpoint, else start it (for torchrun --max-restarts)",
    )  # fmt: skip
    add_config_flags(p, cls, choices={"method": list(METHODS)})
    add_config_flags(p, DataConfig)


def config_from_args(args: argparse.Namespace, cls: type[LoopConfig]) -> LoopConfig:
    """The ``cls`` config of ``--config`` YAML (if any) with every flag given on the command line on top."""
    from imgrec.recipe import load_config

    return load_config(cls, yaml_path=args.config, flags=given(args, cls), data_flags=given(args, DataConfig))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return config_from_args(args, TrainConfig)


def resume_overrides(args: argparse.Namespace, cls: type[LoopConfig]) -> dict:
    """The flags a resumed run takes (machine-dependent ones); a note about the others, which it ignores."""
    values = {**given(args, cls), **given(args, DataConfig)}
    ignored = [name for name, value in values.items() if name not in RESUME_FLAGS and value not in (None, False)]
    if ignored or args.config:
        names = ", ".join("--" + n.replace("_", "-") for n in ignored + (["config"] if args.config else []))
        console.print(f"note: --resume continues the run's own config; ignoring {names}", style="yellow", highlight=False)
    return {name: values[name] for name in RESUME_FLAGS if values[name] is not None}


def run_training(entry: Callable, args: argparse.Namespace, cls: type[LoopConfig]) -> int:
    """Start, resume (--resume RUN) or start-or-resume (--resume auto) a run; a run stopped by
    SIGTERM/SIGINT after its checkpoint exits with 128 + the signal's number, as shells expect."""
    from imgrec.engine.trainer import TrainingInterrupted

    try:
        if args.resume and args.resume != "auto":
            entry(resume=args.resume, console=console, **resume_overrides(args, cls))
        else:
            entry(config_from_args(args, cls), resume=args.resume, console=console)
    except TrainingInterrupted as exc:
        console.print(str(exc), style="yellow", highlight=False)
        return 128 + exc.signum
    return 0


def run_train(args: argparse.Namespace) -> int:
    from imgrec.engine.tasks.classify import train

    return run_training(train, args, TrainConfig)


def run_lr_find(args: argparse.Namespace) -> int:
    import dataclasses

    from imgrec.engine.tasks.classify import lr_find

    config = config_from_args(args, TrainConfig)
    lr_find(dataclasses.replace(config, out=args.out or args.out_default), console=console)
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from imgrec.engine.tasks.pretrain import pretrain

    return run_training(pretrain, args, PretrainConfig)


__all__ = ["add_parsers", "config_from_args", "resume_overrides", "train_config_from_args"]
