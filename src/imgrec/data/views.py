"""Views for self-supervised pretraining: several random augmentations of one image.

Each method's paper fixes its own augmentation (SimCLR: strong colour jitter, blur half the
time; BYOL: asymmetric blur and solarisation). A ``ViewSpec`` holds one view's recipe;
``MultiViewTransform`` reads the file once and returns every view of it as one uint8 tensor
[V, 3, H, W]. The crop and flip are the decode-and-crop pipeline of the supervised loader, so a
view decodes only as much of the JPEG as its crop needs; the colour steps run on the uint8 crop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torchvision.transforms import v2

from imgrec.config import DataConfig
from imgrec.data.decode import DEFAULT_MAX_PIXELS, ImageSource, load_rgb, read_image_bytes
from imgrec.data.decode_crop import RandomResizedCropDecode
from imgrec.data.transforms import check_loader


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation, after the random resized crop and flip of the data config."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    greyscale_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    size: float = 1.0  # the view's side as a fraction of img_size (DINO's local crops: 96 / 224)
    scale: tuple[float, float] | None = None  # its crop's area range (None: the data config's scale)


def adjust_view(spec: ViewSpec, *, jitter_strength: float = 1.0, blur: bool = True) -> ViewSpec:
    """``spec`` with its colour jitter scaled by ``jitter_strength`` (hue capped at 0.5) and, with
    ``blur=False``, no Gaussian blur: the two knobs small images and unusual data call for."""
    b, c, s, h = (v * jitter_strength for v in spec.jitter)
    return replace(spec, jitter=(b, c, s, min(h, 0.5)), blur_p=spec.blur_p if blur else 0.0)


def blur_kernel(img_size: int) -> int:
    """An odd Gaussian kernel of about a tenth of the image side (23 px at 224), at least 3."""
    size = max(3, round(img_size * 0.1))
    return size if size % 2 else size + 1


def view_augment(spec: ViewSpec, img_size: int) -> v2.Compose:
    """The colour steps of ``spec`` on a uint8 CHW crop."""
    steps: list[Any] = []
    if spec.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.greyscale_p > 0:
        steps.append(v2.RandomGrayscale(p=spec.greyscale_p))
    if spec.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(img_size), sigma=(0.1, 2.0))], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    return v2.Compose(steps)


def view_size(spec: ViewSpec, img_size: int) -> int:
    """A view's side in pixels: ``spec.size`` of ``img_size``, a multiple of 8 and at least 32 (at
    most ``img_size``) when scaled (five stride-2 stages need it; below, bf16 weight gradients of the last stage's 1x1 maps
    came out NaN now and then on the CPU)."""
    if spec.size == 1.0:
        return img_size
    return min(img_size, max(32, 8 * round(img_size * spec.size / 8)))


class MultiViewTransform:
    """Every view of one image: a uint8 tensor [V, 3, img_size, img_size] when the views share a
    size, else a tuple of such tensors, one per size in the order the sizes first appear (DINO's
    multi-crop: the global views, then the local ones).

    The file is read once (``loader="fast"``: each view decodes its own crop of the bytes at
    the crop's scale) or decoded once (``"standard"``: Pillow, then each view crops the image).
    """

    takes_source = True

    def __init__(self, config: DataConfig, views: list[ViewSpec], loader: str = "fast"):
        if not views:
            raise ValueError("a multi-view transform needs at least one view")
        self.loader = check_loader(loader)
        self.specs = list(views)
        self.sizes = [view_size(spec, config.img_size) for spec in views]
        self.views = [
            RandomResizedCropDecode(
                size, scale=spec.scale or config.scale, ratio=config.ratio, hflip=config.hflip,
                interpolation=config.interpolation, augment=view_augment(spec, size),
            )
            for spec, size in zip(views, self.sizes)
        ]  # fmt: skip
        # Views of one size, grouped in order of first appearance; a view's index among all views
        # is kept (each draws its crop in that order, so the random stream does not depend on grouping).
        self.groups = [[i for i, s in enumerate(self.sizes) if s == size] for size in dict.fromkeys(self.sizes)]

    def __call__(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.loader == "standard":
            source = load_rgb(source, max_pixels)
        else:
            source = read_image_bytes(source)
        views = [view(source, max_pixels) for view in self.views]
        if len(self.groups) == 1:
            return torch.stack(views)
        return tuple(torch.stack([views[i] for i in group]) for group in self.groups)

    def __repr__(self) -> str:
        return f"MultiViewTransform({len(self.views)} views, {self.views[0]!r}, loader={self.loader})"


__all__ = ["MultiViewTransform", "ViewSpec", "adjust_view", "blur_kernel", "view_augment", "view_size"]
