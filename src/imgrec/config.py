"""Dataclass configs and their YAML form.

Every training flag is a field here: its ``metadata`` holds the help text (and a metavar where
the name alone reads badly), and ``imgrec.cli`` builds the command line from the fields. Choice
lists are the constants below or, for names that grow with the code (SSL methods, inference
backends), the registries the CLI reads them from.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same cap Pillow warns at (about 89 megapixels): far above any photo in ImageNet, far below
# what a crafted "decompression bomb" header declares.
DEFAULT_MAX_PIXELS = 89_478_485
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# "fast": decode-and-crop (imgrec.data.decode_crop); "standard": decode everything, then PIL transforms.
LOADERS = ("fast", "standard")
TTA_MODES = ("flip", "crops", "flip+crops")  # test-time augmentation: imgrec.data.tta
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def option(default: Any = None, help: str = "", *, factory: Any = None, **cli: Any) -> Any:
    """A dataclass field whose metadata gives its command-line flag: ``help``, and optionally
    ``metavar``, ``choices``, ``flag=False`` (no flag: set in YAML or Python only) and ``bounds``,
    the interval its numbers must lie in (``"[0, 1)"``, ``"[1, inf)"``: see ``out_of_bounds``),
    checked by ``check_bounds`` and, before anything runs, by the command line's parser."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def out_of_bounds(value: float, bounds: str) -> str | None:
    """``None`` where ``value`` lies in the interval ``bounds`` (``"[0, 1]"``, ``"(0, inf)"``; a
    square bracket includes its end), else what is wrong with it: "must be at least 1, got 0"."""
    low, high = (float(part) for part in bounds[1:-1].split(","))
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[-1] == "]" else value < high
    if above and below:
        return None
    if high == float("inf"):
        wanted = f"at least {low:g}" if bounds[0] == "[" else f"above {low:g}"
    else:
        wanted = f"in {bounds}"
    return f"must be {wanted}, got {value}"


def check_bounds(config: Any) -> None:
    """Every field of the dataclass ``config`` with ``bounds`` holds a number inside them (each
    element, for a tuple); ``None`` and words (``lr: auto``) are left to their own checks."""
    for f in dataclasses.fields(config):
        value, bounds = getattr(config, f.name), f.metadata.get("bounds")
        if bounds is None or value is None or isinstance(value, str):
            continue
        for number in value if isinstance(value, (tuple, list)) else (value,):
            problem = out_of_bounds(number, bounds)
            if problem:
                raise ValueError(f"{f.name} {problem}")


@dataclass
class DataConfig:
    """How images become tensors: the model's preprocessing plus the training augmentation.

    ``img_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` normally come from the
    model's pretrained data config or the pretrained weights' card (``imgrec.recipe``); the rest
    is the training recipe.
    """

    img_size: int = option(224, "input size in pixels (default: the weights' or the architecture's)", bounds="[1, 8192]")
    crop_pct: float = option(0.875, "eval: resize the shorter side to img_size / crop_pct, then centre-crop (default: the weights' or the architecture's)", bounds="(0, 1]")
    interpolation: str = option("bicubic", "resize interpolation (default: the weights' or the architecture's)", choices=INTERPOLATIONS)
    mean: tuple[float, float, float] = option(IMAGENET_MEAN, "normalisation mean per channel (default: the weights' or the architecture's)", metavar=("R", "G", "B"))
    std: tuple[float, float, float] = option(IMAGENET_STD, "normalisation std per channel (default: the weights' or the architecture's)", metavar=("R", "G", "B"), bounds="(0, inf)")
    scale: tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop area range", metavar=("MIN", "MAX"), bounds="(0, 1]")
    ratio: tuple[float, float] = option((3 / 4, 4 / 3), "RandomResizedCrop aspect range", metavar=("MIN", "MAX"), bounds="(0, inf)")
    hflip: float = option(0.5, "horizontal flip probability", bounds="[0, 1]")
    auto_augment: str | None = option(None, "'trivial' or 'rand-m9-n2' (RandAugment: magnitude, ops)")
    rotation: float = option(0.0, "max rotation in degrees, uniform in [-rotation, rotation]", bounds="[0, 360]")
    random_erasing: float = option(0.0, "probability, per image on the device after normalisation", bounds="[0, 1]")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest allowed width*height of an image (default 89,478,485)", bounds="[1, inf)")
    max_bad_fraction: float = option(0.01, "unreadable files allowed before the dataset is refused", flag=False, bounds="[0, 1]")

    def __post_init__(self) -> None:
        _check_numbers(self)
        check_bounds(self)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} is a range (MIN MAX): MIN must not exceed MAX, got {low} {high}")


# What turns an image into the model's input at inference: what the model card stores.
PREPROCESSING = ("img_size", "crop_pct", "interpolation", "mean", "std")


def preprocessing(config: DataConfig) -> dict[str, Any]:
    """The fields of ``config`` that turn an image into the model's input at inference (JSON-ready):
    what model.json and backbone.json store and what evaluate, predict, probe and fine-tuning read."""
    return {name: list(value) if isinstance(value, tuple) else value for name in PREPROCESSING for value in [getattr(config, name)]}


@dataclass
class LoopConfig:
    """What every training loop takes: data, model, optimisation, hardware, run directory.

    ``TrainConfig`` (supervised) and ``PretrainConfig`` (self-supervised) add their own fields.
    ``None`` means "decide for me": ``batch_size``, ``base_lr`` and ``warmup_epochs`` from the
    data (``imgrec.recipe.resolve_recipe``: enough steps per epoch, the rate of a run from scratch
    or of fine-tuning), ``lr`` from ``base_lr`` scaled linearly by the global batch
    (``batch_size * accum_steps`` images per optimizer step, over 256) or, with ``"auto"``, from
    a learning-rate range test; ``weight_decay`` from the optimizer's (or method's) usual value,
    ``precision`` and ``channels_last`` from the hardware, ``workers`` from the cores.
    ``data_config`` holds DataConfig fields; those not given come from the pretrained weights,
    the data (image size, crop scale) or the architecture.
    """

    OPTIMIZERS: typing.ClassVar[tuple[str, ...]] = ("adamw", "sgd")

    data: str = option("", "dataset root holding train/<class>/ and val/<class>/ (or train/ and val/ folders of shards), class folders alone (a val split is drawn), a flat folder with --labels, or a shard pattern/URL")
    val_data: str | None = option(None, "validation shards, when --data is a shard pattern, pipe: command or URL")
    model: str = option("resnet50", "timm architecture, e.g. resnet50 (`imgrec models` lists them), or your own nn.Module class: path/to/file.py:Net or package.module:Net")
    model_args: dict[str, Any] | None = option(None, "keyword arguments of a --model class (JSON), e.g. '{\"width\": 64}'; num_classes is added where it takes one", metavar="JSON")
    out: str = option("runs/train", "run directory")
    epochs: int = option(30, "passes over the training images", bounds="[1, inf)")
    batch_size: int | None = option(None, "images per step (default: from the number of images, enough steps per epoch)", bounds="[1, inf)")
    accum_steps: int = option(1, "batches per optimizer step (gradient accumulation)", bounds="[1, inf)")
    opt: str | None = option("adamw", "optimizer")
    lr: float | str | None = option(None, "learning rate, or 'auto' for a range test before training (default: --base-lr x batch x accum / 256)", bounds="(0, inf)")
    base_lr: float | None = option(None, "learning rate per 256 images (default: from the data and the starting point)", bounds="(0, inf)")
    weight_decay: float | None = option(None, "adamw 0.05, sgd 1e-4; never on biases and norms", bounds="[0, inf)")
    momentum: float = option(0.9, "SGD (Nesterov's; 0 = plain SGD) and LARS momentum", bounds="[0, 1]")
    warmup_epochs: float | None = option(None, "linear warmup before the cosine decay (default: from the run's length)", bounds="[0, inf)")
    min_lr: float = option(0.0, "the cosine schedule's floor", bounds="[0, inf)")
    precision: str = option("auto", "auto: bf16 where the hardware has it", choices=PRECISIONS)
    channels_last: bool | None = option(None, "NHWC memory (default on)")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(0, "data order, augmentation and initialisation", bounds="[-9223372036854775808, 9223372036854775807]")
    workers: int | None = option(None, "loader processes (default: all cores)", bounds="[0, inf)")
    loader: str = option("fast", "fast: decode-and-crop JPEGs at the crop's scale; standard: torchvision's PIL path", choices=LOADERS)
    steps_per_epoch: int | None = option(None, "cap optimizer steps per epoch (smoke tests, benchmarks)", bounds="[1, inf)")
    tensorboard: bool = option(True, "event files under RUN/tensorboard when tensorboard is installed")
    checkpoint_every: int | None = option(None, "also write last.pt every STEPS optimizer steps (every epoch's end always does)", metavar="STEPS", bounds="[1, inf)")
    checkpoint_minutes: float = option(15.0, "also write last.pt every this many minutes (0 = off)", bounds="[0, inf)")
    max_bad_steps: int = option(10, "stop after this many steps in a row with a non-finite loss, each skipped", bounds="[1, inf)")
    deterministic: bool = option(False, "PyTorch's deterministic algorithms: bitwise-reproducible runs and resumes")
    sync_bn: bool = option(False, "synchronise batch-norm statistics across DDP ranks (GPUs)")
    data_config: dict[str, Any] = option(help="DataConfig fields; the data flags set them", factory=dict, flag=False)

    def __post_init__(self) -> None:
        _check_numbers(self)
        choices = {"opt": (None, *self.OPTIMIZERS), "precision": PRECISIONS, "loader": LOADERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(a for a in allowed if a)}, got {getattr(self, name)!r}")
        check_bounds(self)
        if isinstance(self.lr, str) and self.lr != "auto":
            raise ValueError(f"lr must be a number or 'auto' (a range test picks it), got {self.lr!r}")
        known = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(self.data_config) - known)
        if unknown:
            raise ValueError(f"unknown data_config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        checked = DataConfig(**self.data_config)  # the given fields' types and bounds, now rather than when the data loads
        self.data_config = {
            name: list(checked_value) if isinstance(value, list) else checked_value
            for name, value in self.data_config.items()
            for checked_value in [getattr(checked, name)]
        }


@dataclass
class TrainConfig(LoopConfig):
    """One supervised training run: data, model, recipe and hardware. Saved resolved as ``RUN/config.yaml``."""

    opt: str = option("adamw", "AdamW (default) or SGD with Nesterov momentum; base lr adamw 1e-3, sgd 0.1", choices=LoopConfig.OPTIMIZERS)
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", bounds="[0, 1)")
    mixup: float = option(0.0, "mixup alpha: Beta(alpha, alpha) (0 = off)", bounds="[0, inf)")
    cutmix: float = option(0.0, "cutmix alpha: Beta(alpha, alpha) (0 = off)", bounds="[0, inf)")
    clip_grad: float | None = option(None, "max global gradient norm", bounds="(0, inf)")
    calibrate: bool = option(False, "at the end, fit a temperature on the val split (imgrec calibrate) so that the probabilities match how often the model is right")
    ema_decay: float | None = option(None, "keep an EMA of the weights with this decay, e.g. 0.9998 (0 = off)", bounds="[0, 1)")
    labels: str | None = option(None, "labels of a flat --data folder of images: a filename,class CSV (any header, e.g. Kaggle's id,label) or a JSON {filename: class}", metavar="FILE")
    balance: str | None = option(
        None, "even out imbalanced classes: sampler (each class drawn equally often) or loss (each class's loss weighted by its rarity)", choices=("sampler", "loss")
    )
    val_split: float = option(0.1, "where --data has no val/: the fraction of each class held out for validation, drawn by --seed and kept in the run's split.json", bounds="[0, 1)")
    pretrained: str | None = option(
        None,
        "start from weights: a timm tag (resnet50.a1_in1k; an architecture alone: its default tag) or hf-hub:ORG/REPO through the "
        "Hugging Face cache, a local .safetensors/.pth file, or a run directory (imgrec pretrain: its backbone)",
        metavar="NAME_OR_FILE",
    )
    freeze_backbone: bool = option(False, "train only the classifier")
    layer_decay: float | None = option(None, "layer-wise lr decay for fine-tuning, e.g. 0.75: each block gets this factor of the next one's rate", bounds="(0, 1]")
    train_fraction: float = option(1.0, "train on this class-balanced fraction of the train images (0-1], chosen by --seed", bounds="(0, 1]")
    drop_path: float | None = option(None, "stochastic depth rate", bounds="[0, 1)")
    cache: bool | None = option(None, "decode the training images once into memory and augment them in batches on the device (default: when they fit)")
    teacher: str | None = option(
        None, "distil a trained classifier of the same classes into this model: an imgrec train run or hub weights of one (hf-hub:ORG/REPO)", metavar="RUN_OR_NAME"
    )
    kd_weight: float = option(0.5, "--teacher: the distillation term's weight; the cross-entropy with the labels gets 1 minus it", bounds="[0, 1]")
    kd_temperature: float = option(2.0, "--teacher: softmax temperature of the teacher's and the student's logits in the distillation term", bounds="(0, inf)")
    unlabelled: str | None = option(None, "--teacher: a folder of extra images without labels, learnt from the teacher's answers only", metavar="DIR")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.opt is None:
            raise ValueError("opt must be one of adamw, sgd")


@dataclass
class PretrainConfig(LoopConfig):
    """One self-supervised pretraining run (``imgrec pretrain``). Saved resolved as ``RUN/config.yaml``.

    ``opt``, ``base_lr``, ``weight_decay``, ``warmup_epochs`` and the head sizes default to the
    method's paper (``imgrec.engine.tasks``); ``data_config.scale`` is the views' crop range.
    ``method`` names one of the registered methods (``imgrec.engine.tasks.METHODS``), checked
    when the run starts.
    """

    OPTIMIZERS: typing.ClassVar[tuple[str, ...]] = ("lars", "adamw", "sgd")
    CENTERINGS: typing.ClassVar[tuple[str, ...]] = ("ema", "sinkhorn")  # DINO's teacher targets

    method: str = option(
        "simclr",
        "simclr (contrastive, default), moco (MoCo v3: contrastive, momentum teacher), byol (momentum teacher, no negatives), "
        "dino (self-distillation, multi-crop) or distill (learn a frozen --teacher's embeddings)",
    )
    out: str = option("runs/pretrain", "run directory")
    epochs: int = option(100, "passes over the images", bounds="[1, inf)")
    opt: str | None = option(None, "default: the method's (LARS) at batches of 1,024 and more, else AdamW", choices=OPTIMIZERS)
    base_lr: float | None = option(None, "learning rate per 256 images (default: the method's with its LARS, SimCLR 0.3, MoCo v3 0.6, BYOL 0.2; else adamw 1e-3, sgd 0.1)", bounds="(0, inf)")
    weight_decay: float | None = option(None, "never on biases and norms (default: the method's with LARS, 1e-6 or 1.5e-6; else adamw 0.05, sgd 1e-4)", bounds="[0, inf)")
    temperature: float | None = option(None, "contrastive softmax temperature (SimCLR 0.1, MoCo v3 1.0); DINO: the teacher's, fixed (default 0.04 rising to 0.07)", bounds="(0, inf)")
    proj_hidden_dim: int | None = option(None, "hidden width of the projector/predictor (SimCLR 2048, BYOL 4096)", bounds="[1, inf)")
    proj_dim: int | None = option(None, "output size of the projector (SimCLR 128, BYOL 256)", bounds="[1, inf)")
    jitter_strength: float = option(1.0, "scale the method's colour jitter (brightness, contrast, saturation, hue; hue at most 0.5)", bounds="(0, inf)")
    blur: bool = option(True, "the method's Gaussian blur in the views (off suits images of ~32 px)")
    lars_trust: float = option(1e-3, "LARS trust coefficient (the papers' at batch 4096; small batches want ~0.02)", bounds="(0, inf)")
    teacher_momentum: float | None = option(None, "MoCo v3, BYOL, DINO: the teacher's EMA rate at the start, rising to 1 (default: the paper's 0.99 or 0.996, lower for short runs)", bounds="[0, 1]")
    local_crops: int | None = option(None, "DINO: small views per image besides the 2 global ones (default 6)", bounds="[0, inf)")
    centering: str | None = option(None, "DINO: the teacher's targets balanced by Sinkhorn-Knopp (sinkhorn, DINOv2's, the default) or centred by a running mean (ema, the paper's)", choices=CENTERINGS)
    koleo_weight: float | None = option(None, "DINO: weight of DINOv2's KoLeo term, which spreads the backbone's features over the batch (default 0)", bounds="[0, inf)")
    teacher: str | None = option(
        None, "--method distill: the frozen teacher, a timm tag or hf-hub:ORG/REPO (through the Hugging Face cache), or a run directory",
        metavar="NAME_OR_RUN",
    )
    knn_k: int = option(20, "neighbours of the kNN monitor", bounds="[1, inf)")
    knn_temperature: float = option(0.07, "vote weight exp(cosine / T) of the kNN monitor", bounds="(0, inf)")
    knn_every: int = option(1, "run the kNN monitor every N epochs (0 = never); the last epoch always runs it when on", bounds="[0, inf)")
    knn_bank_size: int | None = option(20_000, "labelled train images in the monitor's bank, class-balanced", bounds="[1, inf)")
    pretrained: str | None = option(
        None, "continue pretraining from weights: a timm tag or hf-hub:ORG/REPO (through the Hugging Face cache), a local file, or a run directory",
        metavar="NAME_OR_FILE",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unused = [k for k in ("auto_augment", "rotation", "random_erasing") if self.data_config.get(k)]
        if unused:
            raise ValueError(f"pretraining views have their method's own augmentation; {', '.join(unused)} do not apply to them")


@dataclass
class ServeConfig:
    """How ``imgrec serve`` batches and what it refuses (``imgrec.serve``)."""

    name: str = option("imgrec", "the model's name in /v2/models/NAME (default: the run folder's name)")
    max_batch: int = option(16, "images in one forward pass", bounds="[1, inf)")
    max_wait_ms: float = option(5.0, "how long a lone request waits for others to batch with", bounds="[0, inf)")
    pad_batches: bool = option(True, "run the network only at batch sizes 1, 2, 4 ... --max-batch (padded up to the next): a few shapes, so the kernel caches stop growing")
    max_body_bytes: int = option(32 << 20, "largest request body", flag=False, bounds="[1, inf)")  # the CLI takes it in MiB: --max-body-mb
    max_pixels: int = option(25_000_000, "largest image in pixels, read from its header", bounds="[1, inf)")
    max_images: int = option(64, "images in one request", bounds="[1, inf)")
    max_queue: int = option(256, "images decoded or queued at once; past it requests get 503 + Retry-After", bounds="[1, inf)")

    def __post_init__(self) -> None:
        _check_numbers(self)
        check_bounds(self)


def _check_numbers(config: Any) -> None:
    """Numeric fields hold numbers: YAML reads ``lr: 1e-3`` as a string (YAML 1.1 wants ``1.0e-3``),
    so numeric strings are converted; anything else is an error naming the field, except in a
    field that also takes words (``lr: auto``), which checks its words itself."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kinds = getattr(config, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None or isinstance(value, bool) or not ({int, float} & set(kinds)):
            continue
        if float in kinds and isinstance(value, (int, float)) or int in kinds and isinstance(value, int):
            continue
        if typing.get_origin(hints[f.name]) is tuple and isinstance(value, (tuple, list)):  # (MIN, MAX), (R, G, B)
            setattr(config, f.name, tuple(_number(f.name, v, kinds) for v in value))
            continue
        try:
            value = _number(f.name, value, kinds)
        except ValueError:
            if str in kinds and isinstance(value, str):
                continue
            raise
        setattr(config, f.name, value)


def _number(name: str, value: Any, kinds: tuple[type, ...]) -> int | float:
    """``value`` as the number a field of types ``kinds`` holds ("1e-3" -> 0.001), else an error naming ``name``."""
    if isinstance(value, bool):
        value = str(value)  # neither True nor False is a number here
    try:
        number = float(value)
        result = int(number) if float not in kinds and number.is_integer() else number
        if float not in kinds and not isinstance(result, int):
            raise ValueError
        return result
    except (TypeError, ValueError, OverflowError):
        wanted = "a number" if float in kinds else "a whole number"
        raise ValueError(f"{name} must be {wanted}, got {value!r}") from None


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


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "LOADERS",
    "PRECISIONS",
    "PREPROCESSING",
    "DataConfig",
    "LoopConfig",
    "PretrainConfig",
    "ServeConfig",
    "TrainConfig",
    "check_bounds",
    "from_dict",
    "load_yaml",
    "option",
    "out_of_bounds",
    "preprocessing",
    "save_yaml",
    "to_dict",
]  # fmt: skip
