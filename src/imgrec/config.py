"""Dataclass configs, their YAML form, and ``key=value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from imgrec.data.decode import DEFAULT_MAX_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """How images become tensors: the model's preprocessing plus the training augmentation.

    ``img_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` normally come from the
    model's pretrained data config (see ``imgrec.data.transforms.resolve_data_config``); the rest
    is the training recipe.
    """

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # RandomResizedCrop: area fraction and aspect-ratio range of the crop.
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None  # "trivial", or "rand" / "rand-m9-n2" (magnitude, ops)
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    random_erasing: float = 0.0  # probability, applied per image on the device after normalisation
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.img_size < 1:
            raise ValueError(f"img_size must be a positive number of pixels, got {self.img_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)


@dataclass
class TrainConfig:
    """One training run: data, model, recipe and hardware. Saved resolved as ``RUN/config.yaml``.

    ``None`` means "decide for me": ``lr`` from ``base_lr`` scaled linearly by the global batch
    (``batch_size * accum_steps`` images per optimizer step, over 256), ``base_lr`` and
    ``weight_decay`` from the optimizer's usual values, ``precision`` and ``channels_last`` from
    the hardware, ``workers`` from the cores. ``data_config`` holds DataConfig fields; those not
    given come from the model's pretrained config (size, crop_pct, interpolation, mean, std).
    """

    data: str = ""  # root with train/ and val/ (folders or shards), or a shard source (then val_data too)
    val_data: str | None = None  # validation shards when ``data`` is a shard pattern, pipe: command or URL
    model: str = "resnet50"
    out: str = "runs/train"
    epochs: int = 30
    batch_size: int = 128
    accum_steps: int = 1
    opt: str = "adamw"  # adamw | sgd (Nesterov momentum)
    lr: float | None = None
    base_lr: float | None = None  # per 256 images: adamw 1e-3, sgd 0.1
    weight_decay: float | None = None  # adamw 0.05, sgd 1e-4; never on norms and biases
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off
    clip_grad: float | None = None  # max global gradient norm
    ema_decay: float | None = None  # e.g. 0.9998; None = no EMA
    pretrained: str | None = None
    freeze_backbone: bool = False
    drop_path: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    workers: int | None = None
    loader: str = "fast"  # fast: decode-and-crop, uint8 all the way; standard: full decode + PIL transforms
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (smoke tests, benchmarks)
    tensorboard: bool = True  # event files under RUN/tensorboard when tensorboard is installed
    data_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_numbers(self)
        choices = {"opt": ("adamw", "sgd"), "precision": ("auto", "fp32", "bf16", "fp16"), "loader": ("fast", "standard")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")
        known = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(self.data_config) - known)
        if unknown:
            raise ValueError(f"unknown data_config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        self.data_config = dict(self.data_config)


def _check_numbers(config: Any) -> None:
    """Numeric fields hold numbers: YAML reads ``lr: 1e-3`` as a string (YAML 1.1 wants ``1.0e-3``),
    so numeric strings are converted; anything else is an error naming the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kinds = getattr(config, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None or isinstance(value, bool) or not ({int, float} & set(kinds)):
            continue
        if float in kinds and isinstance(value, (int, float)) or int in kinds and isinstance(value, int):
            continue
        try:
            number = float(value)
            value = int(number) if float not in kinds and number.is_integer() else number
            if float not in kinds and not isinstance(value, int):
                raise ValueError
        except (TypeError, ValueError):
            wanted = "a number" if float in kinds else "a whole number"
            raise ValueError(f"{f.name} must be {wanted}, got {value!r}") from None
        setattr(config, f.name, value)


T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) that YAML and JSON can hold."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_yaml(config: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return from_dict(cls, values, source=str(path))


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {source}: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return cls(**values)


def apply_overrides(config: T, overrides: list[str]) -> T:
    """A copy of ``config`` with ``key=value`` strings applied; values are parsed as YAML."""
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        changes[key.strip()] = yaml.safe_load(raw)
    merged = {**to_dict(config), **changes}
    return from_dict(type(config), merged, source="overrides")


__all__ = ["DataConfig", "TrainConfig", "IMAGENET_MEAN", "IMAGENET_STD", "apply_overrides", "from_dict", "load_yaml", "save_yaml", "to_dict"]
