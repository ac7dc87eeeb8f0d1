"""Train and eval transform presets (PIL image -> uint8 CHW tensor) and the on-device batch step.

Images stay uint8 all the way through the workers and the collate (a quarter of float32's bytes
through shared memory and over PCIe); ``BatchNormalize`` turns a whole batch into normalised
floats once it is on the device. The input size, crop_pct, interpolation, mean and std come from
the run's data config (``imgrec.recipe.resolve_data_config``: the weights' card or the timm
architecture's own), so nobody retypes them. ``train_transform`` and ``eval_transform`` pick the
fast decode-and-crop pipelines (``imgrec.data.decode_crop``) or these PIL presets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from imgrec.config import INTERPOLATIONS as INTERPOLATION_NAMES
from imgrec.config import LOADERS, DataConfig
from imgrec.data.decode_crop import CenterCropDecode, RandomResizedCropDecode

INTERPOLATIONS = {name: InterpolationMode(name) for name in INTERPOLATION_NAMES}  # name -> torchvision's mode


class StepwiseTransform:
    """A sequence of named steps; ``steps`` lets ``imgrec inspect`` show each one's output."""

    steps: list[tuple[str, Callable[[Any], Any]]]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        for _, step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.steps)
        return f"{type(self).__name__}({names})"


class TrainTransform(StepwiseTransform):
    """RandomResizedCrop + horizontal flip, optional TrivialAugment/RandAugment and rotation.

    Returns a uint8 CHW tensor of ``img_size`` x ``img_size``. Random erasing, mixup/cutmix and
    normalisation work on batches on the device (``BatchNormalize``, the training loop).
    """

    def __init__(
        self,
        *,
        img_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bilinear",
        auto_augment: str | None = None,
        rotation: float = 0.0,
        fill: tuple[int, int, int] = (124, 116, 104),
    ):
        mode = INTERPOLATIONS[interpolation]
        self.steps = [("random_resized_crop", v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, interpolation=mode, antialias=True))]
        if hflip > 0:
            self.steps.append(("horizontal_flip", v2.RandomHorizontalFlip(hflip)))
        self.steps.extend(augment_steps(interpolation, auto_augment, rotation, fill))
        self.steps.append(("to_uint8_tensor", v2.PILToTensor()))

    @classmethod
    def from_config(cls, config: DataConfig) -> TrainTransform:
        return cls(
            img_size=config.img_size,
            scale=config.scale,
            ratio=config.ratio,
            hflip=config.hflip,
            interpolation=config.interpolation,
            auto_augment=config.auto_augment,
            rotation=config.rotation,
            fill=mean_colour(config),
        )


class EvalTransform(StepwiseTransform):
    """Resize the shorter side to ``floor(img_size / crop_pct)``, then centre-crop ``img_size``.

    timm's crop_pct convention: with 224 and 0.875 the image is resized to 256 and cropped to 224.
    """

    def __init__(self, *, img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        self.resize_size = math.floor(img_size / crop_pct)
        mode = INTERPOLATIONS[interpolation]
        self.steps = [
            ("resize_shorter_side", v2.Resize(self.resize_size, interpolation=mode, antialias=True)),
            ("center_crop", v2.CenterCrop(img_size)),
            ("to_uint8_tensor", v2.PILToTensor()),
        ]

    @classmethod
    def from_config(cls, config: DataConfig) -> EvalTransform:
        return cls(img_size=config.img_size, crop_pct=config.crop_pct, interpolation=config.interpolation)


def mean_colour(config: DataConfig) -> tuple[int, int, int]:
    """The dataset mean as an 8-bit colour: what rotation and auto-augment fill uncovered pixels with."""
    return tuple(round(m * 255) for m in config.mean)


def augment_steps(interpolation: str, auto_augment: str | None, rotation: float, fill: tuple[int, int, int]) -> list[tuple[str, Any]]:
    """The augmentations after the crop and flip; each works on PIL images and uint8 tensors alike."""
    mode, steps = INTERPOLATIONS[interpolation], []
    if auto_augment:
        steps.append(("auto_augment", auto_augment_transform(auto_augment, mode, fill)))
    if rotation:
        steps.append(("rotation", v2.RandomRotation(rotation, interpolation=mode, fill=list(fill))))
    return steps


def train_transform(config: DataConfig, loader: str = "fast") -> Callable[..., torch.Tensor]:
    """The training pipeline of ``config``: decode-and-crop (``fast``) or PIL transforms (``standard``)."""
    if check_loader(loader) == "standard":
        return TrainTransform.from_config(config)
    steps = augment_steps(config.interpolation, config.auto_augment, config.rotation, mean_colour(config))
    return RandomResizedCropDecode(
        config.img_size, scale=config.scale, ratio=config.ratio, hflip=config.hflip, interpolation=config.interpolation,
        augment=v2.Compose([step for _, step in steps]) if steps else None,
    )  # fmt: skip


def eval_transform(config: DataConfig, loader: str = "fast") -> Callable[..., torch.Tensor]:
    """The evaluation pipeline of ``config``: resize the shorter side, centre crop; fast or standard."""
    if check_loader(loader) == "standard":
        return EvalTransform.from_config(config)
    return CenterCropDecode(config.img_size, crop_pct=config.crop_pct, interpolation=config.interpolation)


def check_loader(loader: str) -> str:
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    return loader


def auto_augment_transform(spec: str, interpolation: InterpolationMode, fill: tuple[int, int, int]) -> Callable[[Any], Any]:
    """``trivial`` (TrivialAugmentWide) or ``rand[-mM][-nN]`` (RandAugment, magnitude M, N ops)."""
    spec = spec.lower()
    if spec in ("trivial", "trivialaugment", "ta"):
        return v2.TrivialAugmentWide(interpolation=interpolation, fill=list(fill))
    match = re.fullmatch(r"rand(?:-m(\d+))?(?:-n(\d+))?", spec)
    if match:
        magnitude, num_ops = int(match.group(1) or 9), int(match.group(2) or 2)
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=interpolation, fill=list(fill))
    raise ValueError(f"unknown auto_augment {spec!r}: use 'trivial' or 'rand', 'rand-m9-n2' (magnitude 9, 2 ops)")


class BatchNormalize(torch.nn.Module):
    """uint8 NCHW batch -> normalised float batch, on whatever device the batch is on.

    Optionally in channels_last memory format, and with random erasing (timm's, per-pixel normal
    noise) applied after normalisation, which is where that augmentation is defined.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        channels_last: bool = False,
        random_erasing: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last
        self.dtype = dtype
        self.erase = None
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=random_erasing, mode="pixel", device="cpu")

    @classmethod
    def from_config(cls, config: DataConfig, *, train: bool = False, channels_last: bool = False) -> BatchNormalize:
        return cls(config.mean, config.std, channels_last=channels_last, random_erasing=config.random_erasing if train else 0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchNormalize expects a uint8 batch, got {images.dtype}")
        x = images.to(torch.float32) * self.scale - self.shift
        if self.erase is not None:
            self.erase.device = x.device
            x = self.erase(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)
