"""Where a run's settings come from, in one order: flags > YAML > the pretrained weights' card >
the data > the architecture's defaults > the dataclass defaults.

``load_config`` merges the first two into a ``TrainConfig`` / ``PretrainConfig`` (the CLI calls it);
``resolve_recipe`` fills in what the user left open from the data (``imgrec.data.stats``: how
many images, how large) and the starting point (from scratch, or fine-tuning pretrained weights),
with a reason for each choice; ``resolve_data_config`` adds the card's and the architecture's
preprocessing (train, pretrain, probe and ``imgrec inspect`` call it), so that a model fine-tuned
from weights pretrained at 160 px is fed 160 px images unless told otherwise, and a timm
architecture gets its own mean, std and crop. The rules are one table, ``RULES``; BENCHMARKS.md
says what each rests on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import yaml

from imgrec.card import ModelCard
from imgrec.config import PREPROCESSING, DataConfig, LoopConfig, PretrainConfig, from_dict
from imgrec.data.stats import DataStats
from imgrec.data.views import view_size
from imgrec.models.hub import preprocessing_of

C = TypeVar("C")


def load_config(cls: type[C], *, yaml_path: str | os.PathLike | None = None, flags: dict[str, Any] | None = None, data_flags: dict[str, Any] | None = None) -> C:
    """The ``cls`` config of the YAML file (if any) with every given flag on top.

    ``flags`` hold ``cls`` fields and ``data_flags`` ``DataConfig`` fields (into ``data_config``);
    a value of ``None`` was not given and leaves the YAML's value, or the default, in place.
    """
    values: dict[str, Any] = {}
    if yaml_path:
        try:  # open() rather than a file test: a pipe (/dev/stdin, <(...)) is a config too
            with open(yaml_path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ValueError(f"--config {yaml_path}: no such file; pass a YAML file of {cls.__name__} fields (a run's config.yaml is one)") from None
        except yaml.YAMLError as exc:  # one line: where, and what the parser wanted
            mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{yaml_path} is not valid YAML{where}: {problem or str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{yaml_path} must hold a mapping of {cls.__name__} fields, e.g. 'epochs: 10'")
    values.update({name: value for name, value in (flags or {}).items() if value is not None})
    data_config = dict(values.get("data_config") or {})
    data_config.update({name: value for name, value in (data_flags or {}).items() if value is not None})
    values["data_config"] = data_config
    return from_dict(cls, values, source=str(yaml_path) if yaml_path else "flags")


def architecture_preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """The preprocessing timm's config gives ``model``'s architecture (size, crop, interpolation, mean, std)."""
    from timm.data import resolve_model_data_config

    return preprocessing_of(resolve_model_data_config(model))  # the same reading as a pretrained weights' config


def resolve_data_config(
    model: torch.nn.Module | None = None, base: DataConfig | None = None, *, card: ModelCard | None = None, **given: Any
) -> DataConfig:
    """The data config of a run: ``given`` fields (``None`` = not given), else the preprocessing of
    the pretrained weights' ``card``, else ``model``'s architecture defaults, else ``base`` (or
    ``DataConfig()``). Only ``img_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` come
    from the card and the architecture; the augmentation is the recipe's."""
    config = base or DataConfig()
    if model is not None:
        config = dataclasses.replace(config, **architecture_preprocessing(model))
    if card is not None:
        config = dataclasses.replace(config, **{name: getattr(card.data_config, name) for name in PREPROCESSING if name in card.stated})
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


# The recipe's rules in one table. Each rests on measurements on small real datasets (BENCHMARKS.md,
# "Recipes that fit the data") or, for large datasets where nothing could be measured here, on
# ImageNet practice (the earlier defaults).
RULES: dict[str, Any] = {
    "steps_per_epoch": 20,  # the batch is the largest power of two that leaves at least this many optimizer steps per epoch...
    "batch_cpu": (16, 128),  # ...within this range on a CPU
    "batch_gpu": (16, 256),  # ...and on a GPU
    "scratch_lr": {"adamw": 8e-3, "sgd": 0.4},  # per 256 images, a small dataset from scratch
    "imagenet_lr": {"adamw": 1e-3, "sgd": 0.1},  # per 256 images, at and above ``large`` images (ImageNet practice)
    "large": 100_000,  # images: from here on the ImageNet rates
    # Fine-tuning: this fraction of the rate from scratch, by where the weights come from. Weights of
    # an imgrec run (trained on a small dataset) fine-tune best at the full rate (measured:
    # BENCHMARKS.md, "Fine-tuning weights we made"); weights by name or from a file (ImageNet-scale
    # training, as timm's tags are) keep ImageNet practice's lower rate, not measured here.
    "finetune_lr": {"run": 1.0, "weights": 0.25},
    "warmup_fraction": 0.05,  # of the run's steps, in whole epochs' terms (at most ``warmup_max`` epochs)
    "warmup_max": 1.0,
    "finetune_warmup_fraction": 0.02,
    "pretrain_warmup_fraction": 0.1,  # self-supervised runs: the papers' 10 of 100 epochs...
    "pretrain_warmup_max": 10.0,  # ...at most 10
    "min_size": 32,  # smallest input the recipe picks: five stride-2 stages need it
    "pretrain_min_size": 64,  # ...and for self-supervised pretraining (its features need more than the 1x1 last stage of 32 px inputs)
    "small_image": 64,  # images whose shorter side is at most this (scans, thumbnails): the crop rules below
    "small_scale": ((8, 1.0), (30, 0.6)),  # RandomResizedCrop's smallest area for them, by the run's epochs: (epochs, area)
    # points measured; linear between them, flat outside. Short runs underfit and want whole images; a crop of 8% of a 32 px image keeps nothing
    "small_crop_pct": 1.0,  # and no centre crop at eval: the object fills the frame
    "mirror": 1.0,  # no horizontal flip when mirroring moves the classes' average images more than they differ (digits, writing)
    "pretrain_lars_batch": 1024,  # self-supervised methods keep their paper's LARS only at global batches this large...
    "pretrain_adamw": {"base_lr": 4e-3, "weight_decay": 1e-4},  # ...and use AdamW below (benchmarks/ssl_transfer.py)...
    "pretrain_adamw_lr": {"dino": 8e-3},  # ...at these rates per 256 for the methods named (DINO on 960 photographs: 1e-3 78.3, 4e-3 84.2, 8e-3 88.8)
    "pretrain_crop_px": 16,  # a pretraining view crops at least this many pixels of the image's shorter side (smaller crops of small images hold nothing)
    "teacher_horizon": 0.05,  # a momentum teacher averages over at most this fraction of the run's steps (1 / (1 - momentum))...
    "teacher_momentum_min": 0.9,  # ...but at least over 10 steps (a teacher that copies the student collapses: DINO paper, Table 7)
    "same_size_local_crops": 2,  # DINO's local views where they come out as large as the global ones (inputs of at most 32 px)
    "dino_prototypes": 4096,  # DINO's output size below ``large`` images (the paper's 65,536 are for ImageNet)
}


@dataclass(frozen=True)
class Choice:
    """One setting the recipe chose, and why."""

    name: str  # the flag, without dashes: batch_size, lr, img_size, scale...
    value: Any
    reason: str


def pick_batch_size(images: int, device: torch.device) -> tuple[int, str]:
    low, high = RULES["batch_gpu"] if device.type == "cuda" else RULES["batch_cpu"]
    wanted = max(1, images // RULES["steps_per_epoch"])
    batch = max(low, min(high, 1 << (wanted.bit_length() - 1)))
    batch = min(batch, 1 << (max(1, images).bit_length() - 1))  # never more than the images: at least one full batch
    return batch, f"{images:,} images: {images // batch} steps per epoch"


def small_scale(epochs: int) -> tuple[float, float]:
    """RandomResizedCrop's area range for small images in a run of ``epochs``: ``RULES["small_scale"]``'s points, linear between them."""
    (e0, a0), (e1, a1) = RULES["small_scale"]
    t = min(1.0, max(0.0, (epochs - e0) / (e1 - e0)))
    return (round(a0 + t * (a1 - a0), 2), 1.0)


def pick_image_size(
    stats: DataStats, architecture: dict[str, Any], given: dict[str, Any], card: ModelCard | None, crops: bool = True, epochs: int = 30,
    least: int | None = None,
) -> list[Choice]:
    """The input size (at least ``least`` px, default ``RULES["min_size"]``), small images'
    evaluation whole (no centre crop: also what a pretrained backbone's card passes on to its
    probes and fine-tuning) and, with ``crops``, their training crops in a run of ``epochs``,
    where neither the user nor the weights' card set them."""
    least = least or RULES["min_size"]
    stated = set(card.stated) if card is not None else set()
    if stats.short_side is None:
        return []
    choices = []
    default = architecture["img_size"]
    if "img_size" not in given and "img_size" not in stated and stats.short_side < default:
        size = min(default, max(least, 8 * round(stats.short_side / 8)))
        why = f"the images' median shorter side is {stats.short_side} px" + (f" (at least {least} px{' to pretrain on' if least != RULES['min_size'] else ''})" if size != stats.short_side else "")
        choices.append(Choice("img_size", size, f"{why}; the architecture's {default} px would enlarge them {default / stats.short_side:.1f}x"))
    if stats.short_side <= RULES["small_image"]:
        if crops and "scale" not in given:
            scale = small_scale(epochs)
            why = f"images of {stats.short_side} px, {epochs} epochs: crops of at least {scale[0]:.0%} of the image"
            choices.append(Choice("scale", scale, why + (" (short runs underfit: whole images)" if scale[0] == 1.0 else "")))
        if "crop_pct" not in given and "crop_pct" not in stated:
            choices.append(Choice("crop_pct", RULES["small_crop_pct"], f"images of {stats.short_side} px: evaluated whole, not centre-cropped"))
    return choices


def pick_flip(stats: DataStats, given: dict[str, Any]) -> list[Choice]:
    """No horizontal flip where left and right carry meaning (``DataStats.mirror``)."""
    if "hflip" in given or stats.mirror is None or stats.mirror <= RULES["mirror"]:
        return []
    return [Choice("hflip", 0.0, f"a mirrored class average moves {stats.mirror:.1f}x as far as the classes are apart: left and right mean something here")]


def pick_base_lr(config: LoopConfig, stats: DataStats, batch: int, finetune: str | None) -> list[Choice]:
    """The rate per 256 images, where the user set neither ``lr`` nor ``base_lr``; ``finetune``:
    None (from scratch), "run" (an imgrec run's weights) or "weights" (by name or from a file)."""
    if config.lr is not None or config.base_lr is not None:
        return []
    large = stats.images >= RULES["large"]
    rate = (RULES["imagenet_lr"] if large else RULES["scratch_lr"])[config.opt] * (RULES["finetune_lr"][finetune] if finetune else 1.0)
    start = {None: "from scratch", "run": "fine-tuning an imgrec run's weights (x1)", "weights": f"fine-tuning pretrained weights (x{RULES['finetune_lr']['weights']:g})"}[finetune]
    size = f"{stats.images:,} images" + (" (ImageNet's rate)" if large else "")
    return [Choice("base_lr", rate, f"{config.opt} {start}, {size}: {rate:.3g} per 256 images, {rate * batch * config.accum_steps / 256:.3g} at this batch")]


def pick_warmup(config: LoopConfig, finetune: str | None) -> list[Choice]:
    if config.warmup_epochs is not None:
        return []
    kind = "pretrain_" if isinstance(config, PretrainConfig) else "finetune_" if finetune else ""
    fraction, most = RULES[f"{kind}warmup_fraction"], RULES["pretrain_warmup_max" if kind == "pretrain_" else "warmup_max"]
    epochs = round(min(most, fraction * config.epochs), 2)
    return [Choice("warmup_epochs", epochs, f"{fraction:.0%} of {config.epochs} epochs, at most {most:g}")]


def resolve_recipe(
    config: LoopConfig, stats: DataStats, *, model: torch.nn.Module, device: torch.device, card: ModelCard | None = None, finetune: str | None = None,
    method: Any = None,
) -> tuple[LoopConfig, list[Choice]]:
    """``config`` with what the user left open (``None``, or absent from ``data_config``) chosen from
    the data's ``stats``, the architecture (``model``), the pretrained weights' ``card``, whether
    this is fine-tuning, the device and, for pretraining, the self-supervised ``method`` (its
    ``SSLMethod`` class: its crops, teacher, views); and the choices, each with its reason."""
    choices: list[Choice] = []
    batch = config.batch_size
    if batch is None:
        batch, why = pick_batch_size(stats.images, device)
        choices.append(Choice("batch_size", batch, why))
    pretraining = isinstance(config, PretrainConfig)
    choices += pick_pretrain_optimizer(config, batch) if pretraining else pick_base_lr(config, stats, batch, finetune)
    choices += pick_warmup(config, finetune)
    least = RULES["pretrain_min_size"] if pretraining else None
    choices += pick_image_size(stats, architecture_preprocessing(model), config.data_config, card, crops=not pretraining, epochs=config.epochs, least=least)
    if pretraining and method is not None:
        choices += pick_pretrain_method_settings(config, method, stats, batch, choices, card)
    choices += pick_flip(stats, config.data_config)
    fields = {c.name: c.value for c in choices if c.name in {f.name for f in dataclasses.fields(config)}}
    data = {c.name: c.value for c in choices if c.name not in fields}
    return dataclasses.replace(config, **fields, data_config={**config.data_config, **data}), choices


def pick_pretrain_optimizer(config: PretrainConfig, batch: int) -> list[Choice]:
    """Self-supervised methods: their paper's LARS at large global batches, AdamW at small ones."""
    global_batch = batch * config.accum_steps
    if config.opt is not None or global_batch >= RULES["pretrain_lars_batch"]:
        return []
    adamw = RULES["pretrain_adamw"]
    choices = [Choice("opt", "adamw", f"a global batch of {global_batch}: LARS barely moves under {RULES['pretrain_lars_batch']:,}")]
    if config.lr is None and config.base_lr is None:
        rate = RULES["pretrain_adamw_lr"].get(config.method, adamw["base_lr"])
        choices.append(Choice("base_lr", rate, f"AdamW for {config.method} at small batches: {rate:g} per 256 images"))
    if config.weight_decay is None:
        choices.append(Choice("weight_decay", adamw["weight_decay"], "AdamW for self-supervised learning at small batches"))
    return choices


def pick_pretrain_method_settings(
    config: PretrainConfig, method: Any, stats: DataStats, batch: int, chosen: list[Choice] = (), card: ModelCard | None = None
) -> list[Choice]:
    """The views' crop range for the images' size, a momentum teacher's starting rate for the run's
    real number of steps, DINO's local views and prototypes for the data: where the user set none."""
    choices = []
    if "scale" not in config.data_config:
        low, why = method.crop_scale[0], f"{config.method}'s views crop {method.crop_scale[0]:.0%}-100% of the image"
        if stats.short_side:
            least = min(1.0, (RULES["pretrain_crop_px"] / stats.short_side) ** 2)
            if least > low:
                low, why = round(least, 2), f"images of {stats.short_side} px: a crop keeps at least {RULES['pretrain_crop_px']} px of the side ({config.method}'s own {method.crop_scale[0]:.0%} would keep {stats.short_side * method.crop_scale[0] ** 0.5:.0f})"
        choices.append(Choice("scale", (low, 1.0), why))
    paper = getattr(method, "teacher_momentum", None)
    if paper is not None and config.teacher_momentum is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_epoch = max(1, stats.images // world // batch // config.accum_steps)  # full batches, as the loop counts them
        if config.steps_per_epoch is not None:
            per_epoch = min(per_epoch, config.steps_per_epoch)
        steps = config.epochs * per_epoch
        horizon = RULES["teacher_horizon"] * steps
        if horizon < 1 / (1 - paper):
            momentum = round(max(RULES["teacher_momentum_min"], 1 - 1 / max(horizon, 1.0)), 4)
            why = f"{steps:,} steps: the teacher averages over its last ~{max(horizon, 1):.0f} ({RULES['teacher_horizon']:.0%} of the run); the paper's {paper:g} would average over {1 / (1 - paper):.0f}"
            choices.append(Choice("teacher_momentum", momentum, why))
    if method.local_crops and config.local_crops is None:
        card_size = card.data_config.img_size if card is not None and "img_size" in card.stated else 0
        size = int(config.data_config.get("img_size") or next((c.value for c in chosen if c.name == "img_size"), 0) or card_size)
        local = [spec for spec in method.views if spec.size != 1.0]
        if size and local and view_size(local[0], size) >= size:
            n = RULES["same_size_local_crops"]
            choices.append(Choice("local_crops", n, f"{size} px views: the local ones cannot be smaller (32 px at least) and cost what global ones do: {n}, not {method.local_crops}"))
    if config.method == "dino" and config.proj_dim is None and stats.images < RULES["large"]:
        choices.append(Choice("proj_dim", RULES["dino_prototypes"], f"{stats.images:,} images: {RULES['dino_prototypes']:,} prototypes (the paper's 65,536 are for ImageNet's 1.28 million)"))
    return choices


__all__ = ["RULES", "Choice", "architecture_preprocessing", "load_config", "resolve_data_config", "resolve_recipe"]
