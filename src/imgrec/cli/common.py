"""What every command module shares: the console, and flags generated from config dataclasses.

A config field becomes ``--field-name``: its type gives the argument's type (``bool`` an
``--x/--no-x`` pair, a tuple ``nargs``), its metadata the help, metavar and choices
(``imgrec.config.option``). The flag's default is ``None``, so that a value not given on the
command line leaves the YAML's value, or the dataclass default, in place; the help shows the
dataclass default. Nothing here imports torch: ``imgrec --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console

from imgrec.config import TTA_MODES, out_of_bounds

console = Console(soft_wrap=True)  # long paths stay on one line, greppable


def flag_fields(cls: type, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag (all but those marked ``flag=False``), optionally only ``only``."""
    names = set(only) if only is not None else None
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True) and (names is None or f.name in names)]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None, choices: dict[str, Sequence[str]] | None = None) -> None:
    """One flag per field of the dataclass ``cls`` (see the module's docstring); ``choices`` gives
    the choice lists that come from registries (SSL methods, backends) by field name."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls, only):
        kind = _without_none(hints[f.name])
        options: dict[str, Any] = {"default": None, "help": _help(f)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is dict or typing.get_origin(kind) is dict:
            options["type"] = json_object
        elif typing.get_origin(kind) is tuple:
            parts = typing.get_args(kind)
            options.update(type=bounded(parts[0], f.metadata.get("bounds")), nargs=len(parts))
        elif kind is str and {int, float} & set(typing.get_args(hints[f.name])):  # a number or a word: --lr 3e-4 or --lr auto
            number_kind = float if float in typing.get_args(hints[f.name]) else int
            options["type"] = number_or_word(bounded(number_kind, f.metadata.get("bounds")))
        else:
            options["type"] = bounded(kind, f.metadata.get("bounds"))
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        if allowed:
            options["choices"] = [c for c in allowed if c is not None]
        if "metavar" in f.metadata:
            options["metavar"] = f.metadata["metavar"]
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def bounded(kind: Any, bounds: str | None) -> Any:
    """An argparse ``type`` that reads ``kind`` (int, float) and refuses a number outside
    ``bounds`` (``"[1, inf)"``, ``"[0, 65535]"``: ``imgrec.config.out_of_bounds``), so that argparse
    names the flag: ``argument --port: must be in [0, 65535], got 99999``. ``kind`` itself where
    there are no bounds or it is not a number type."""
    if bounds is None or kind not in (int, float):
        return kind

    def convert(text: str) -> Any:
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'x'"
        problem = out_of_bounds(value, bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = kind.__name__
    return convert


def add_tta_flag(p: argparse.ArgumentParser) -> None:
    """``--tta`` of evaluate, predict and serve (``imgrec.data.tta``)."""
    p.add_argument(
        "--tta", choices=TTA_MODES, default=None,
        help="test-time augmentation: average the logits of the image and its mirror (flip, 2x the time), with four corner crops (crops, 5x) or both (flip+crops, 10x); off by default",
    )  # fmt: skip


def number_or_word(number: Any) -> Any:
    """An argparse ``type`` for a field that takes a number or a word (``--lr auto``): what reads
    as a number goes through ``number`` (its bounds checked); a word is passed on to the config,
    which checks its words."""

    def convert(text: str) -> Any:
        try:
            float(text)
        except ValueError:
            return text
        return number(text)

    convert.__name__ = "number"
    return convert


def json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object value (argparse reports the error, naming the flag)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 64}}', got {text!r}")
    return value


def given(args: argparse.Namespace, cls: type, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The values of ``cls``'s flags in ``args`` (``None``: not given)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls, only)}


def _without_none(kind: Any) -> Any:
    """``int`` for ``int | None``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        parts = [p for p in typing.get_args(kind) if p is not type(None)]
        return parts[0] if len(parts) == 1 else str
    return kind


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default
    if default is dataclasses.MISSING or default is None or default == "" or "default" in text:
        return text.replace("%", "%%")
    shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) if isinstance(default, tuple) else default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    return f"{text} (default {shown})".replace("%", "%%")


__all__ = ["add_config_flags", "console", "flag_fields", "given"]
