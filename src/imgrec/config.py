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


PREPROCESSING = ("img_size", "crop_pct", "interpolation", "mean", "std")


def preprocessing(config: DataConfig) -> dict[str, Any]:
    """The fields of ``config`` that turn an image into the model's input at inference (JSON-ready):
    what model.json and backbone.json store and what evaluate, predict, probe and fine-tuning read."""
    return {name: list(value) if isinstance(value, tuple) else value for name in PREPROCESSING for value in [getattr(config, name)]}


@dataclass
class LoopConfig:
    """What every training loop takes: data, model, optimisation, hardware, run directory.

    ``TrainConfig`` (supervised) and ``PretrainConfig`` (self-supervised) add their own fields.
    ``None`` means "decide for me": ``lr`` from ``base_lr`` scaled linearly by the global batch
    (``batch_size * accum_steps`` images per optimizer step, over 256), ``base_lr`` and
    ``weight_decay`` from the optimizer's (or method's) usual values, ``precision`` and
    ``channels_last`` from the hardware, ``workers`` from the cores. ``data_config`` holds
    DataConfig fields; those not given come from the model's pretrained config.
    """

    OPTIMIZERS: typing.ClassVar[tuple[str, ...]] = ("adamw", "sgd")

    data: str = ""  # root with train/ and val/ (folders or shards), or a shard source (then val_data too)
    val_data: str | None = None  # validation shards when ``data`` is a shard pattern, pipe: command or URL
    model: str = "resnet50"
    out: str = "runs/train"
    epochs: int = 30
    batch_size: int = 128
    accum_steps: int = 1
    opt: str | None = "adamw"  # adamw | sgd (Nesterov momentum) | lars (pretraining)
    lr: float | None = None
    base_lr: float | None = None  # per 256 images: adamw 1e-3, sgd 0.1
    weight_decay: float | None = None  # adamw 0.05, sgd 1e-4; never on norms and biases
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    workers: int | None = None
    loader: str = "fast"  # fast: decode-and-crop, uint8 all the way; standard: full decode + PIL transforms
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (smoke tests, benchmarks)
    tensorboard: bool = True  # event files under RUN/tensorboard when tensorboard is installed
    checkpoint_every: int | None = None  # optimizer steps between mid-epoch checkpoints (every epoch's end always saves)
    checkpoint_minutes: float = 15.0  # minutes between mid-epoch checkpoints (0 = only by steps and at epochs' ends)
    max_bad_steps: int = 10  # steps in a row whose loss is not finite (each skipped) before the run stops
    deterministic: bool = False  # PyTorch's deterministic algorithms: a resumed run bitwise equal to a straight one
    sync_bn: bool = False  # synchronise batch-norm statistics across ranks (DDP on GPUs)
    data_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_numbers(self)
        choices = {"opt": (None, *self.OPTIMIZERS), "precision": ("auto", "fp32", "bf16", "fp16"), "loader": ("fast", "standard")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(a for a in allowed if a)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "checkpoint_every", "max_bad_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_minutes < 0:
            raise ValueError(f"checkpoint_minutes must be 0 (off) or positive, got {self.checkpoint_minutes}")
        known = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(self.data_config) - known)
        if unknown:
            raise ValueError(f"unknown data_config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        self.data_config = dict(self.data_config)


@dataclass
class TrainConfig(LoopConfig):
    """One supervised training run: data, model, recipe and hardware. Saved resolved as ``RUN/config.yaml``."""

    opt: str = "adamw"
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off
    clip_grad: float | None = None  # max global gradient norm
    ema_decay: float | None = None  # e.g. 0.9998; None = no EMA
    pretrained: str | None = None  # weights file, or a run directory (its backbone.safetensors / model.safetensors)
    freeze_backbone: bool = False
    layer_decay: float | None = None  # e.g. 0.75: each block towards the input learns at this factor of the next one's rate
    train_fraction: float = 1.0  # train on this class-balanced fraction of the training images, chosen by the seed
    drop_path: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.opt is None:
            raise ValueError("opt must be one of adamw, sgd")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class PretrainConfig(LoopConfig):
    """One self-supervised pretraining run (``imgrec pretrain``). Saved resolved as ``RUN/config.yaml``.

    ``opt``, ``base_lr``, ``weight_decay``, ``warmup_epochs`` and the head sizes default to the
    method's paper (``imgrec.ssl``); ``data_config.scale`` is the views' crop range.
    """

    OPTIMIZERS: typing.ClassVar[tuple[str, ...]] = ("lars", "adamw", "sgd")

    method: str = "simclr"  # simclr | moco | byol
    out: str = "runs/pretrain"
    epochs: int = 100
    batch_size: int = 256
    opt: str | None = None  # the method's: LARS
    warmup_epochs: float = 10.0
    temperature: float | None = None  # contrastive softmax temperature (SimCLR 0.1, MoCo v3 1.0)
    proj_hidden_dim: int | None = None  # projector (and predictor) hidden width (SimCLR 2048, BYOL 4096)
    proj_dim: int | None = None  # projection size (SimCLR 128, BYOL 256)
    jitter_strength: float = 1.0  # scales the method's colour jitter (brightness, contrast, saturation, hue; hue at most 0.5)
    blur: bool = True  # the method's Gaussian blur in the views (SimCLR's paper drops it for 32-px CIFAR images)
    lars_trust: float = 1e-3  # LARS trust coefficient: each step moves a tensor by about lr x trust of its norm
    teacher_momentum: float | None = None  # MoCo v3, BYOL: EMA rate of the target network at the start (to 1 by a cosine)
    knn_k: int = 20  # the monitor's neighbours
    knn_temperature: float = 0.07  # the monitor's vote weights exp(cosine / T)
    knn_every: int = 1  # epochs between kNN monitor runs (0 = off); the last epoch always runs it when on
    knn_bank_size: int | None = 20_000  # at most this many labelled train images in the monitor's memory bank

    def __post_init__(self) -> None:
        super().__post_init__()
        from imgrec.ssl import METHODS  # the methods register themselves; no torch needed to list names

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        positive = {"knn_k": self.knn_k, "knn_temperature": self.knn_temperature, "lars_trust": self.lars_trust, "temperature": self.temperature, "jitter_strength": self.jitter_strength,
                    "knn_bank_size": self.knn_bank_size, "proj_dim": self.proj_dim, "proj_hidden_dim": self.proj_hidden_dim}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.knn_every < 0:
            raise ValueError(f"knn_every must be 0 (no monitor) or a number of epochs, got {self.knn_every}")
        if self.teacher_momentum is not None and not 0 <= self.teacher_momentum <= 1:
            raise ValueError(f"teacher_momentum must be in [0, 1], got {self.teacher_momentum}")
        unused = [k for k in ("auto_augment", "rotation", "random_erasing") if self.data_config.get(k)]
        if unused:
            raise ValueError(f"pretraining views have their method's own augmentation; {', '.join(unused)} do not apply to them")


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


__all__ = ["PREPROCESSING", "DataConfig", "LoopConfig", "preprocessing", "PretrainConfig", "TrainConfig", "IMAGENET_MEAN", "IMAGENET_STD", "apply_overrides", "from_dict", "load_yaml", "save_yaml", "to_dict"]
