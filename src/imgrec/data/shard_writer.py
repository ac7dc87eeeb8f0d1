"""Write an ImageFolder as WebDataset tar shards (``imgrec shards``): work done once, before training.

Each image is decoded robustly, shrunk to at most ``max_side`` on its longer side and re-encoded
as a JPEG; samples go out in a seeded shuffled order (readers only shuffle within a buffer) as
``KEY.jpg`` + ``KEY.cls`` members, the layout timm, OpenCLIP and webdataset read. Next to the
shards: ``classes.json`` (the class index) and ``shards.json`` (samples per shard, written last:
its presence means the set is complete). ``imgrec.data.shards`` reads them back.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import IO, Any

import numpy as np
import simplejpeg
from PIL import Image
from webdataset import TarWriter

from imgrec.data.decode import BadImageError, load_rgb
from imgrec.data.folder import DatasetError, read_class_index, scan_image_folder, write_class_index
from imgrec.data.shards import SHARD_NAME, SHARD_NAME_RE
from imgrec.progress import track
from imgrec.utils import available_cpus, write_json

WRITE_SEED = 0
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: "1GB" = 10**9, "500MB", "64KiB" = 65536, "1.5GB", or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _SIZE_UNITS or not match:
        raise ValueError(f"invalid size {text!r}: give bytes with an optional unit, e.g. 500MB, 1GB or 64KiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: must be more than 0 bytes")
    return size


@dataclass
class ShardsInfo:
    """What ``write_shards`` wrote: ``shards`` as [{"name", "samples", "bytes"}], ``skipped`` as [{"path", "reason"}]."""

    out: Path
    classes: list[str]
    shards: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    max_side: int = 512
    quality: int = 90

    @property
    def samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard["bytes"] for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"classes": len(self.classes), "samples": self.samples, "shards": self.shards,
                "max_side": self.max_side, "quality": self.quality, "skipped": self.skipped}  # fmt: skip


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` scaled so that its longer side is at most ``max_side`` (aspect kept, never enlarged).

    ``reducing_gap`` first shrinks by whole factors with a box filter, then finishes with Lanczos:
    the quality of Lanczos all the way at a fraction of the cost on large photos.
    """
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(path: str, max_side: int, quality: int) -> bytes:
    """The file at ``path`` decoded robustly, shrunk to ``max_side`` and re-encoded as a JPEG; raises ``BadImageError``."""
    image = shrink(load_rgb(path), max_side)
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(np.asarray(image)), quality=quality, colorspace="RGB", colorsubsampling="420"
    )


def _encode_job(job: tuple[str, int, int]) -> tuple[bytes | None, str | None]:
    try:
        return encode_image(*job), None
    except BadImageError as exc:
        return None, exc.reason


def write_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_side: int = 512,
    quality: int = 90,
    shard_size: int = 10**9,
    classes: str | os.PathLike | Sequence[str] | None = None,
    workers: int | None = None,
    console: Any = None,
) -> ShardsInfo:
    """Write the ImageFolder ``src`` as ``out/shard-NNNNNN.tar`` shards plus classes.json and shards.json.

    Images are re-encoded (longer side at most ``max_side``, JPEG ``quality``) by ``workers``
    processes and written in a permutation seeded by 0, so every shard mixes all classes (readers
    only shuffle within a buffer) and the bytes do not depend on the number of workers. A shard
    is closed before it would grow past ``shard_size`` bytes. ``classes`` (a class index JSON as
    written by ``write_class_index``, or the names) fixes the class indices, e.g. for val with
    train's. Unreadable files are skipped and listed, never fatal.
    """
    if max_side < 1 or not 1 <= quality <= 100:
        raise ValueError(f"need max_side >= 1 and quality in 1..100, got {max_side} and {quality}")
    if isinstance(classes, (str, os.PathLike)):
        classes = read_class_index(classes)
    _check_not_a_dataset_root(Path(src))
    samples, class_names = scan_image_folder(src, None if classes is None else list(classes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards.json").unlink(missing_ok=True)  # until rewritten, the set in ``out`` is incomplete
    order = np.random.default_rng(WRITE_SEED).permutation(len(samples))
    jobs = [(samples[i][0], max_side, quality) for i in order]
    workers = min(workers or available_cpus(), max(1, len(jobs)))
    shards = _ShardFiles(out, shard_size, console)
    skipped: list[dict[str, str]] = []
    pool = Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_encode_job, jobs, chunksize=16) if pool else map(_encode_job, jobs)
        for i, (data, reason) in zip(order, track(results, f"writing shards of {src}", console=console, total=len(jobs))):  # in input order: deterministic output
            path, label = samples[i]
            if data is None:
                skipped.append({"path": path, "reason": reason})
            else:
                shards.add({"jpg": data, "cls": str(label).encode("ascii")})
        shards.close()
    finally:
        shards.abort()  # a no-op unless an error left a shard half-written
        if pool:
            pool.terminate()
            pool.join()
    for stale in sorted(out.iterdir()):  # a previous, longer run's shards would be read as data
        if SHARD_NAME_RE.fullmatch(stale.name) and stale.name not in {s["name"] for s in shards.written}:
            stale.unlink()
    info = ShardsInfo(out, class_names, shards.written, skipped, max_side, quality)
    write_class_index(out / "classes.json", class_names)
    write_json(out / "shards.json", info.to_json())  # last: its presence means the set is complete
    if console is not None:
        _print_summary(console, info)
    return info


def _check_not_a_dataset_root(src: Path) -> None:
    """A root holding train/<class>/ and val/<class>/ would scan as two classes, "train" and "val"."""
    train = src / "train"
    splits_only = src.is_dir() and {p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")} <= {
        "train",
        "val",
    }
    if splits_only and train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        raise DatasetError(
            f"{src} is a dataset root (train/<class>/, val/<class>/), not an ImageFolder: write each split "
            f"on its own, e.g. `imgrec shards {src}/train OUT/train`, then "
            f"`imgrec shards {src}/val OUT/val --classes OUT/train/classes.json`"
        )


class _ShardFiles:
    """Numbered tar files that roll over before they pass ``shard_size``; each written under a
    temporary name and renamed when complete, so a shard that exists is always whole."""

    def __init__(self, out: Path, shard_size: int, console: Any):
        self.out, self.shard_size, self.console = out, shard_size, console
        self.written: list[dict[str, Any]] = []
        self.file: IO[bytes] | None = None
        self.tar: TarWriter | None = None
        self.samples = self.content_bytes = self.keys = 0

    def add(self, members: dict[str, bytes]) -> None:
        size = sum(512 + _round_up(len(data), 512) for data in members.values())  # header + padded data
        if self.tar is not None and self.samples and _tar_size(self.content_bytes + size) > self.shard_size:
            self._finish()
        if self.tar is None:
            self.path = self.out / SHARD_NAME.format(len(self.written))
            self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (open across add() calls, closed in _finish/abort)
            self.tar = TarWriter(self.file, encoder=False, mtime=0, user="imgrec", group="imgrec")
            self.samples = self.content_bytes = 0
        self.tar.write({"__key__": f"{self.keys:09d}", **members})
        self.samples += 1
        self.keys += 1
        self.content_bytes += size

    def _finish(self) -> None:
        assert self.tar is not None and self.file is not None
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.tar = self.file = None
        shard = {"name": self.path.name, "samples": self.samples, "bytes": self.path.stat().st_size}
        self.written.append(shard)
        if self.console is not None:
            self.console.print(f"wrote {self.path}: {shard['samples']} images, {_human(shard['bytes'])}", highlight=False)

    def close(self) -> None:
        if self.tar is not None:
            self._finish()

    def abort(self) -> None:
        """Remove a half-written shard (after an error)."""
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = self.file = None


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _tar_size(content_bytes: int) -> int:
    """A tar file's size: members, two zero blocks at the end, padded to tarfile's 10 KiB records."""
    return _round_up(content_bytes + 2 * 512, tarfile.RECORDSIZE)


def _human(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _print_summary(console: Any, info: ShardsInfo) -> None:
    for entry in info.skipped:
        console.print(f"skipped {entry['path']}: {entry['reason']}", style="yellow", highlight=False)
    console.print(
        f"{info.samples} images in {len(info.classes)} classes written to {len(info.shards)} shard(s) in {info.out}, "
        f"{_human(info.bytes)}; {len(info.skipped)} unreadable file(s) skipped",
        style="bold", highlight=False,
    )  # fmt: skip
