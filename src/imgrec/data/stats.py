"""What a training set looks like, read cheaply before the first step: how many images and classes,
how balanced, and how large the images are (from a sample of file headers, no decoding).

The recipe (``imgrec.recipe.resolve_recipe``) picks the batch size, learning rate, image size and
augmentation that the user left open from these figures.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from imgrec.data.decode import EncodedImage

HEADER_SAMPLE = 256  # files whose headers are read: the median size of a few hundred is stable
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
    return DataStats(len(paths), classes, min(counts.values(), default=0), max(counts.values(), default=0), short, long, grey / max(1, len(sizes)))


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


__all__ = ["DataStats", "dataset_stats", "read_header"]
