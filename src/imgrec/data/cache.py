"""The small-data fast path: a training set decoded once into memory and augmented in batches.

When the decoded training images fit a memory budget (a fraction of the free RAM, or of the GPU's
memory when training there), ``ImageCache`` decodes each image once, resized so that its
shorter side is a little over the training size (never enlarged), into one uint8 tensor on the
training device. ``CachedTrainLoader`` then draws each epoch's batches from it: the order of the
``EpochSampler``, a random resized crop and flip per image computed for the whole batch at once
(``BatchedRandomResizedCrop``, one ``grid_sample``), no loader processes, so that every core
computes. The crops follow torchvision's ``RandomResizedCrop`` exactly in distribution (the same
rule, drawn from uniform numbers that are a pure function of (seed, epoch, image)), so a run
resumed in the middle of an epoch, or spread over ranks, draws what a straight run draws.
``CachedEvalLoader`` holds the validation images after the eval transform, so validating is a
forward pass over a tensor.

Large datasets, and recipes whose augmentation the batched path does not do (auto-augment,
rotation), keep the file pipeline (``imgrec.data.loader``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from imgrec import distributed
from imgrec.config import DataConfig
from imgrec.data.loader import create_loader
from imgrec.data.sampler import EpochSampler
from imgrec.data.stats import DataStats

CACHE_FRACTION = 0.25  # of the memory available on the training device that a cache may take
CACHE_MARGIN = 1.15  # cached shorter side over the training size, so that a crop of the whole image is not upsampled
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before it falls back to a centre crop
DRAWS = 4 * CROP_ATTEMPTS + 1  # uniform numbers per image: area, aspect, top, left per attempt, and the flip


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the RAM Linux reports as available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cache_side(img_size: int, short_side: int) -> int:
    """The shorter side images are cached at: a margin over the training size, never above their own."""
    return min(short_side, math.ceil(img_size * CACHE_MARGIN))


def cache_bytes(stats: DataStats, img_size: int) -> int | None:
    """The size of a cache of the training set at ``img_size`` (None when the image sizes are not known)."""
    if stats.short_side is None or stats.long_side is None:
        return None
    side = cache_side(img_size, stats.short_side)
    long = math.ceil(side * stats.long_side / stats.short_side)
    return stats.images * 3 * long * long  # a canvas either way up: landscape and portrait images share it


def cache_plan(stats: DataStats, config: DataConfig, device: torch.device, wanted: bool | None) -> tuple[bool, str]:
    """(whether to cache, why): ``wanted`` True or False decides; None caches when the set fits the budget."""
    if wanted is False:
        return False, "--no-cache"
    if config.auto_augment or config.rotation:
        return False, "auto-augment and rotation run on the file pipeline only"
    size = cache_bytes(stats, config.img_size)
    if size is None:
        return False, "the image sizes are not known ahead (shards)"
    sharing = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each process on a machine caches its own copy
    budget = int(CACHE_FRACTION * available_memory(device) / sharing)
    if wanted is None and size > budget:
        return False, f"decoded, the training images would take {size / 2**20:,.0f} MiB, over the cache budget of {budget / 2**20:,.0f} MiB"
    return True, f"{size / 2**20:,.0f} MiB decoded in {'GPU memory' if device.type == 'cuda' else 'RAM'}"


def keyed_uniforms(seed: int, epoch: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) [len(indices), count], float64, each a pure function of (seed, epoch,
    image index, draw): a counter-based generator (SplitMix64's mixing of a Weyl sequence), so
    that any subset of images in any order, on any rank, gets the same numbers."""
    with np.errstate(over="ignore"):
        key = np.array([seed % 2**64], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.array([epoch % 2**64], dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        counter = indices.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)[None, :]
        z = key + (counter + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(1 << 53))


class BatchedRandomResizedCrop:
    """torchvision's RandomResizedCrop (and a horizontal flip) for a whole batch at once.

    The boxes follow torchvision's rule: up to 10 tries of an area fraction uniform in ``scale``
    and an aspect ratio log-uniform in ``ratio``, the first that fits placed uniformly, else the
    centre crop of the nearest aspect. The crops are resampled by one ``grid_sample`` (bilinear
    or bicubic, as the data config says) to ``size`` x ``size`` uint8.
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bilinear"):  # fmt: skip
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.mode = "nearest" if interpolation == "nearest" else interpolation

    def boxes(self, heights: torch.Tensor, widths: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(top, left, height, width, flip) per image, from ``uniforms`` [N, DRAWS] (float64, CPU)."""
        heights, widths = heights.to(torch.float64)[:, None], widths.to(torch.float64)[:, None]
        tries = uniforms[:, : 4 * CROP_ATTEMPTS].reshape(-1, CROP_ATTEMPTS, 4)
        area = heights * widths * (self.scale[0] + (self.scale[1] - self.scale[0]) * tries[..., 0])
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * tries[..., 1])
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
        first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # the first try that fits (0 when none does)
        pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
        h, w = pick(h), pick(w)
        top = torch.floor(pick(tries[..., 2]) * (heights.squeeze(1) - h + 1))
        left = torch.floor(pick(tries[..., 3]) * (widths.squeeze(1) - w + 1))
        fallback = ~fits.any(dim=1)
        if fallback.any():
            top, left, h, w = self.centre_boxes(heights.squeeze(1), widths.squeeze(1), fallback, (top, left, h, w))
        flip = uniforms[:, -1] < self.hflip
        return top, left, h, w, flip

    def centre_boxes(self, heights, widths, rows, boxes):
        """torchvision's fallback: the centre crop at the aspect ratio nearest the image's."""
        top, left, h, w = (t.clone() for t in boxes)
        in_ratio = widths / heights
        cw = torch.where(in_ratio < self.ratio[0], widths, torch.where(in_ratio > self.ratio[1], torch.round(heights * self.ratio[1]), widths))
        ch = torch.where(in_ratio < self.ratio[0], torch.round(widths / self.ratio[0]), heights)
        h[rows], w[rows] = ch[rows], cw[rows]
        top[rows], left[rows] = torch.div(heights - ch, 2, rounding_mode="floor")[rows], torch.div(widths - cw, 2, rounding_mode="floor")[rows]
        return top, left, h, w

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """uint8 crops [B, 3, size, size] of ``images`` (uint8 [B, 3, H, W] canvases, each image in its
        top-left ``sizes`` [B, 2] (height, width) corner)."""
        return self.resample(images, *self.boxes(sizes[:, 0].cpu(), sizes[:, 1].cpu(), uniforms))

    def resample(self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The boxes (top, left, height, width in pixels; flip) of ``images`` resized to ``size`` x ``size`` uint8."""
        canvas_h, canvas_w = images.shape[-2:]
        theta = torch.zeros(len(images), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(flip, -w / canvas_w, w / canvas_w)
        theta[:, 0, 2] = (2 * left + w) / canvas_w - 1
        theta[:, 1, 1] = h / canvas_h
        theta[:, 1, 2] = (2 * top + h) / canvas_h - 1
        grid = F.affine_grid(theta.to(images.device, torch.float32), [len(images), 3, self.size, self.size], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode=self.mode, padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


class ResizeShorter:
    """Decode a file and shrink it (never enlarge) so that its shorter side is ``side``: uint8 CHW."""

    def __init__(self, side: int, interpolation: str):
        self.side = side
        self.resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[interpolation]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        short = min(image.size)
        if short > self.side:
            image = image.resize((max(1, round(image.width * self.side / short)), max(1, round(image.height * self.side / short))), self.resample)
        return pil_to_tensor(image)


class ImageCache:
    """Every image of a folder dataset, decoded once: uint8 canvases [N, 3, H, W] on ``device``
    (each image in the top-left corner of its canvas), their sizes [N, 2] and labels [N].
    Unreadable files are left out (the dataset's skip log lists them)."""

    def __init__(self, dataset: Any, *, side: int, interpolation: str, device: torch.device, workers: int | None = None):
        source = _copy_with_transform(dataset, ResizeShorter(side, interpolation))
        loader = create_loader(source, batch_size=64, train=False, num_workers=workers, collate_fn=_collate_sizes, every_rank_reads_all=True)
        pieces = [batch for batch in loader if batch is not None]
        if not pieces:
            raise ValueError(f"no readable image in {dataset.root} to cache")
        self.sizes = torch.cat([sizes for _, sizes, _ in pieces])
        height, width = (int(v) for v in self.sizes.max(dim=0).values)
        self.images = torch.zeros(len(self.sizes), 3, height, width, dtype=torch.uint8, device=device)
        row = 0
        for images, sizes, _ in pieces:
            for image, (h, w) in zip(images, sizes.tolist()):
                self.images[row, :, :h, :w] = image[:, :h, :w].to(device)
                row += 1
        self.labels = torch.cat([labels for _, _, labels in pieces]).to(device)
        self.sizes = self.sizes.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.numel()


class CachedTrainLoader:
    """Training batches from an ``ImageCache``: this rank's share of each epoch in the
    ``EpochSampler``'s order, cropped and flipped by ``BatchedRandomResizedCrop`` with numbers
    keyed by (seed, epoch, image). It stands where the trainer expects a DataLoader (``sampler``,
    ``dataset.set_epoch``, ``generator``, ``batch_size``, ``num_workers``, ``len``)."""

    num_workers = 0

    def __init__(self, cache: ImageCache, crop: BatchedRandomResizedCrop, *, batch_size: int, seed: int, weights: Sequence[float] | None = None):
        self.cache, self.crop, self.batch_size = cache, crop, batch_size
        self.sampler = EpochSampler(len(cache), seed=seed, rank=distributed.rank(), world=distributed.world_size(), weights=weights)
        self.dataset = _Epoch(seed)
        self.generator = torch.Generator()  # the trainer seeds it each epoch; nothing here draws from it

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        full = len(order) // self.batch_size * self.batch_size
        for start in range(0, full, self.batch_size):
            index = order[start : start + self.batch_size]
            uniforms = keyed_uniforms(self.dataset.seed, self.dataset.epoch, index, DRAWS)
            on_device = index.to(self.cache.images.device)
            yield self.crop(self.cache.images[on_device], self.cache.sizes[on_device], uniforms), self.cache.labels[on_device]


class CachedEvalLoader:
    """Validation batches from images already through the eval transform: uint8 [N, 3, S, S] on the
    device, this rank's share in order (every image once over the ranks)."""

    def __init__(self, dataset: Any, *, batch_size: int, device: torch.device, workers: int | None = None, channels_last: bool = True):
        loader = create_loader(dataset, batch_size=64, train=False, num_workers=workers, skip_none=True, channels_last=channels_last, every_rank_reads_all=True)
        pieces = [batch for batch in loader if batch is not None]
        if not pieces:
            raise ValueError(f"no readable image in {dataset.root} to validate on")
        self.images = torch.cat([images for images, _ in pieces]).to(device)
        self.labels = torch.cat([labels for _, labels in pieces]).to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        share = torch.arange(distributed.rank(), len(self.labels), distributed.world_size(), device=self.labels.device)
        for start in range(0, len(share), self.batch_size):
            index = share[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


class _Epoch:
    """The (seed, epoch) the crops are keyed by; the trainer calls ``set_epoch`` as on a dataset."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _copy_with_transform(dataset: Any, transform: Any) -> Any:
    import copy

    source = copy.copy(dataset)
    source.transform, source.replace_bad = transform, False
    return source


def _collate_sizes(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(images padded to the batch's largest [B, 3, H, W], their sizes [B, 2], labels [B]) of the
    samples that loaded (None for a batch of unreadable files only)."""
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    sizes = torch.tensor([image.shape[1:] for image, _ in batch], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    images = torch.zeros(len(batch), 3, height, width, dtype=torch.uint8)
    for row, (image, _) in enumerate(batch):
        images[row, :, : image.shape[1], : image.shape[2]] = image
    return images, sizes, torch.tensor([label for _, label in batch], dtype=torch.int64)


__all__ = [
    "CACHE_FRACTION",
    "BatchedRandomResizedCrop",
    "CachedEvalLoader",
    "CachedTrainLoader",
    "ImageCache",
    "ResizeShorter",
    "available_memory",
    "cache_bytes",
    "cache_plan",
    "cache_side",
    "keyed_uniforms",
]
