"""What a training set looks like, read cheaply before the first step: how many images and classes,
how balanced, how large the images are (from a sample of file headers, no decoding), and
whether left and right carry meaning in it (from a few dozen thumbnails per class).

The recipe (``imgrec.recipe.resolve_recipe``) picks the batch size, learning rate, image size and
augmentation that the user left open from these figures.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imgrec.data.decode import EncodedImage

HEADER_SAMPLE = 256  # files whose headers are read: the median size of a few hundred is stable
MIRROR_PER_CLASS, MIRROR_CLASSES, MIRROR_SIDE = 32, 64, 16  # the mirror test's thumbnails: per class, classes, pixels
MIRROR_SIGNAL = 2.0  # the classes' average images must differ by this many times their sampling noise for the test to say anything
ONE_CHANNEL = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P")  # "P": palette, often a grey scan; checked below


@dataclass(frozen=True)
class DataStats:
    """The figures of a training set the recipe's rules read."""

    images: int
    classes: int
    smallest_class: int  # images in the rarest class (0 when the labels are not known ahead, as in shards)
    largest_class: int
    short_side: int | None  # median shorter side of the sampled images, in pixels (None: sizes not readable ahead)
    long_side: int | None
    grey: float  # fraction of the sampled images stored without colour (0 when not read)
    mirror: float | None = None  # how far mirroring moves a class's average image, over how far apart the classes' averages are (None: not measured)

    @property
    def per_class(self) -> float:
        return self.images / max(1, self.classes)


def dataset_stats(dataset: Any, sample: int = HEADER_SAMPLE, seed: int = 0) -> DataStats:
    """The ``DataStats`` of a folder dataset (``samples``: (path, label) pairs) or a shard set
    (counts from its index; image sizes are not read ahead there)."""
    classes = len(dataset.classes)
    if not hasattr(dataset, "samples"):
        return DataStats(len(dataset), classes, 0, 0, None, None, 0.0)
    counts = Counter(label for _, label in dataset.samples)
    paths = [path for path, _ in dataset.samples]
    picked = paths if len(paths) <= sample else random.Random(seed).sample(paths, sample)
    sizes, grey = [], 0
    for path in picked:
        header = read_header(path)
        if header is not None:
            (width, height), is_grey = header
            sizes.append((min(width, height), max(width, height)))
            grey += is_grey
    short = round(statistics.median(s for s, _ in sizes)) if sizes else None
    long = round(statistics.median(w for _, w in sizes)) if sizes else None
    smallest, largest = min(counts.values(), default=0), max(counts.values(), default=0)
    return DataStats(len(paths), classes, smallest, largest, short, long, grey / max(1, len(sizes)), mirror_asymmetry(dataset.samples, seed))


def mirror_asymmetry(samples: list[tuple[str, int]], seed: int = 0) -> float | None:
    """How much left and right mean in a labelled image set: for each class the average of up to 32
    grey 16 x 16 thumbnails, then the mean squared change of those averages under a mirror,
    over their mean squared spread around the average of all classes; both corrected for the
    averages' sampling noise. Over 1: a mirror image would look like another class, as with digits
    and writing; near 0: photographs, textures, faces, whose classes are the same either way.
    None when the classes' averages do not stand out of their noise (too few images, or classes
    that look alike on average, as textures do)."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    rng = random.Random(seed)
    labels = sorted(by_class) if len(by_class) <= MIRROR_CLASSES else sorted(rng.sample(sorted(by_class), MIRROR_CLASSES))
    means, noise = [], []
    for label in labels:
        paths = by_class[label] if len(by_class[label]) <= MIRROR_PER_CLASS else rng.sample(by_class[label], MIRROR_PER_CLASS)
        thumbs = [t for t in (_thumbnail(p) for p in paths) if t is not None]
        if len(thumbs) < 2:
            return None
        stack = np.stack(thumbs)
        means.append(stack.mean(axis=0))
        noise.append(stack.var(axis=0, ddof=1).mean() / len(thumbs))
    if len(means) < 2:
        return None
    means = np.stack(means)
    sampling = float(np.mean(noise))
    asymmetry = float(np.mean((means - means[:, :, ::-1]) ** 2)) - 2 * sampling
    spread = float(np.mean((means - means.mean(axis=0)) ** 2)) - sampling * (1 - 1 / len(means))
    if spread <= 0 or spread < MIRROR_SIGNAL * sampling:
        return None
    return max(0.0, asymmetry / spread)


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image.draft("L", (MIRROR_SIDE * 2, MIRROR_SIDE * 2))  # a JPEG decodes at a fraction of its size
            return np.asarray(image.convert("L").resize((MIRROR_SIDE, MIRROR_SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    except Exception:  # unreadable files are the loader's business
        return None


def read_header(source: Any) -> tuple[tuple[int, int], bool] | None:
    """((width, height), stored without colour) from an image file's header, upright per EXIF; None if unreadable."""
    import io

    try:
        opened = Image.open(io.BytesIO(source.data)) if isinstance(source, EncodedImage) else Image.open(source)
        with opened as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn: a viewer shows it the other way
                width, height = height, width
            grey = image.mode in ONE_CHANNEL and not (image.mode == "P" and _palette_has_colour(image))
            return (width, height), grey
    except Exception:  # unreadable files are the loader's business (skipped and logged there)
        return None


def _palette_has_colour(image: Image.Image) -> bool:
    palette = image.getpalette() or []
    return any(len({r, g, b}) > 1 for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3]))


__all__ = ["DataStats", "dataset_stats", "mirror_asymmetry", "read_header"]
