"""The built-in demo dataset: shapes on cluttered, textured backgrounds, as an ImageFolder of JPEGs.

Each class is a shape (circle, triangle, star...). Its colour, texture, position, size and
rotation are drawn at random, and it sits on a smooth colour field with texture noise, stripes,
lines and irregular blobs, some of them drawn over it. So the class depends on shape alone: a
linear classifier on raw pixels stays near chance, while a small CNN learns it. Every image has
its own random stream seeded by (seed, split, class, index), so the output is the same bytes
whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imgrec.config import option
from imgrec.utils import available_cpus

SHAPES = (
    "circle", "triangle", "square", "pentagon", "hexagon", "star",
    "cross", "ring", "crescent", "arrow", "heart", "semicircle",
)  # fmt: skip
SPLITS = ("train", "val")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SynthSpec:
    """What ``imgrec synth`` draws; each field is a flag of the command."""

    classes: int = option(10, "shapes, one class each")
    train_per_class: int = option(300, "training images per class")
    val_per_class: int = option(60, "validation images per class")
    seed: int = option(0, "the images drawn")
    min_side: int = option(96, "smallest image side in pixels")
    max_side: int = option(320, "largest image side in pixels")
    clutter: float = option(1.0, "0-1: amount of background noise, stripes, blobs and occluding lines (0: a plain colour field)")
    background: float = option(1.0, "0-1: contrast of the background's colour field (0: one flat colour)")

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(SHAPES):
            raise ValueError(f"classes must be between 2 and {len(SHAPES)} (one per shape), got {self.classes}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError("train_per_class and val_per_class must be at least 1")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        for name in ("clutter", "background"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


def write_synth_dataset(out: str | os.PathLike, spec: SynthSpec | None = None, workers: int | None = None) -> Path:
    """Write ``out/train/<shape>/*.jpg`` and ``out/val/<shape>/*.jpg`` (``spec`` default: ``SynthSpec()``); returns ``out``."""
    out = Path(out)
    spec = spec if spec is not None else SynthSpec()
    jobs = []
    for split_id, split in enumerate(SPLITS):
        count = spec.train_per_class if split == "train" else spec.val_per_class
        for class_id in range(spec.classes):
            folder = out / split / SHAPES[class_id]
            folder.mkdir(parents=True, exist_ok=True)
            jobs.extend((spec, split_id, class_id, i, str(folder / f"{SHAPES[class_id]}_{i:05d}.jpg")) for i in range(count))
    workers = workers or available_cpus()
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)
    (out / "imgrec-synth.json").write_text(json.dumps({"shapes": list(SHAPES[: spec.classes]), **asdict(spec)}, indent=2) + "\n")
    return out


def _write_one(job: tuple[SynthSpec, int, int, int, str]) -> None:
    spec, split_id, class_id, index, path = job
    rng = np.random.default_rng([spec.seed, split_id, class_id, index])
    render_sample(rng, SHAPES[class_id], spec.min_side, spec.max_side, spec.clutter, spec.background).save(path, "JPEG", quality=JPEG_QUALITY)


def render_sample(
    rng: np.random.Generator, shape: str, min_side: int = 96, max_side: int = 320, clutter: float = 1.0, background: float = 1.0
) -> Image.Image:
    """One RGB image of ``shape`` on a cluttered background, all randomness drawn from ``rng``.

    ``clutter`` (0 to 1) scales the distractors: noise and stripe amplitude, and the number of
    blobs and lines. ``background`` (0 to 1) scales the contrast of the coarse colour field
    behind them: at 0 each image has one flat background colour, so that what two crops of an
    image share is mostly the object (the self-supervised benchmark's variant). At 1 both knobs
    give the same image, byte for byte, as before they existed.
    """
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    if max(width, height) > 2.5 * min(width, height):  # keep aspect ratios photo-like
        height = int(np.clip(height, width / 2.5, width * 2.5))
    canvas = _background(rng, width, height, clutter, background)
    draw = ImageDraw.Draw(canvas)
    for _ in range(round(int(rng.integers(2, 5)) * clutter)):
        _draw_blob(rng, draw, width, height)
    _draw_lines(rng, draw, width, height, count=round(int(rng.integers(3, 9)) * clutter))

    short = min(width, height)
    radius = short * rng.uniform(0.2, 0.4)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    mask = _shape_mask(shape, (width, height), (cx, cy), radius, rng.uniform(0, 2 * math.pi))
    background_mean = np.asarray(canvas, dtype=np.float32).reshape(-1, 3).mean(0)
    canvas.paste(_object_fill(rng, (width, height), background_mean), mask=mask)
    if rng.random() < 0.5:  # an outline in another colour, as drawn objects often have
        edge = mask.filter(ImageFilter.MaxFilter(3))
        outline = Image.fromarray(np.subtract(np.asarray(edge), np.asarray(mask)).astype(np.uint8))
        canvas.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), mask=outline)

    _draw_lines(rng, ImageDraw.Draw(canvas), width, height, count=round(int(rng.integers(1, 4)) * clutter))  # occluders
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return canvas


def _background(rng: np.random.Generator, width: int, height: int, clutter: float = 1.0, background: float = 1.0) -> Image.Image:
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    if background != 1.0:
        mean = field.reshape(-1, 3).mean(0)
        field = mean + background * (field - mean)
    noise = rng.normal(0, rng.uniform(4, 20) * clutter, size=(height, width, 1)).astype(np.float32)
    if rng.random() < 0.5:  # stripes at a random angle and period
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        noise = noise + (rng.uniform(10, 35) * clutter * np.sin(phase))[..., None]
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def _draw_lines(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int, count: int) -> None:
    for _ in range(count):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(int(rng.integers(2, 4)))]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))


def _draw_blob(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """An irregular polygon, smaller than the objects and unlike any class shape."""
    n = int(rng.integers(6, 11))
    radius = min(width, height) * rng.uniform(0.05, 0.14)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.4, 1.0, n)
    points = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)]
    draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))


def _object_fill(rng: np.random.Generator, size: tuple[int, int], background_mean: np.ndarray) -> Image.Image:
    """A random colour with a little texture, pushed away from the background's mean brightness."""
    colour = rng.integers(0, 256, 3).astype(np.float32)
    if abs(colour.mean() - background_mean.mean()) < 50:
        colour = np.clip(colour + (90 if background_mean.mean() < 128 else -90), 0, 255)
    width, height = size
    texture = rng.normal(0, rng.uniform(0, 12), size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(colour + texture, 0, 255).astype(np.uint8))


def _shape_mask(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float) -> Image.Image:
    """An 'L' mask (255 inside) of ``shape`` of circumradius ``radius`` rotated by ``angle``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre

    def place(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in points]

    def disc(dx: float, dy: float, r: float, fill: int) -> None:
        (x, y), rr = place([(dx, dy)])[0], r * radius
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)

    if shape == "circle":
        disc(0, 0, 1, 255)
    elif shape == "ring":
        disc(0, 0, 1, 255)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        disc(0, 0, 1, 255)
        disc(0.45, 0, 0.85, 0)
    elif shape == "semicircle":
        draw.polygon(place([(math.cos(t), math.sin(t)) for t in np.linspace(0, math.pi, 48)]), fill=255)
    elif shape in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        draw.polygon(place([(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]), fill=255)
    elif shape == "star":
        points = [((1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5), (1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi * k / 5)) for k in range(10)]
        draw.polygon(place(points), fill=255)
    elif shape == "cross":
        a, b = 0.3, 1.0
        draw.polygon(place([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]), fill=255)
    elif shape == "arrow":
        draw.polygon(place([(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)]), fill=255)
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 17
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17
        draw.polygon(place(list(zip(x.tolist(), y.tolist()))), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask
