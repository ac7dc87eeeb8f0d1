"""Image files for tests: valid ones in every odd format, and every kind of broken one."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR (8-bit RGB) declaring width x height, with no pixel data."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def decompression_bomb() -> bytes:
    """A few hundred bytes that declare 60000x60000 pixels (3.6 gigapixels)."""
    return png_header(60000, 60000) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b"")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def make_class_folders(root: Path, counts: dict[str, int]) -> None:
    """``root/<class>/<i>.jpg``: ``counts[class]`` small noise photos in each class folder."""
    for seed, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            photo(12, 10, 10 * seed + i).save(root / name / f"{i}.jpg")


def write_odd_files(folder: Path) -> tuple[set[str], set[str]]:
    """Every odd case from the data issue in ``folder``: (readable paths, bad paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    good: dict[str, Image.Image | bytes] = {
        "cmyk.jpg": photo(40, 30, 1).convert("CMYK"),
        "grey.jpg": photo(40, 30, 2).convert("L"),
        "palette.png": photo(40, 30, 3).convert("P"),
        "rgba.png": photo(40, 30, 4).convert("RGBA"),
        "la.png": photo(40, 30, 5).convert("LA"),
        "grey16.png": Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)),
        "png_named.JPEG": photo(40, 30, 6),
        "photo.webp": photo(40, 30, 7),
        "one_pixel.png": photo(1, 1, 8),
        "wide.jpg": photo(2000, 20, 9),
    }
    for name, image in good.items():
        fmt = "PNG" if name.endswith(("png", "JPEG")) else "WEBP" if name.endswith("webp") else "JPEG"
        image.save(folder / name, fmt)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(40, 30, 10).save(folder / "rotated.jpg", "JPEG", exif=exif.tobytes())

    full_jpeg = jpeg_bytes(photo(64, 48, 11), quality=90)
    bad: dict[str, bytes] = {
        "empty.jpg": b"",
        "truncated.jpg": full_jpeg[: len(full_jpeg) // 2],
        "random.jpg": np.random.default_rng(12).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text.jpg": b"this is not an image, just some notes\n" * 20,
        "header_only.png": png_header(64, 48),
        "bomb.png": decompression_bomb(),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    good_paths = {str(folder / n) for n in [*good, "rotated.jpg"]}
    return good_paths, {str(folder / n) for n in bad}
