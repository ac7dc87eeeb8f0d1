"""Decode any image file a user may have into an RGB PIL image, or say precisely why not.

Real datasets hold CMYK JPEGs, 16-bit PNGs, palette GIFs, PNGs named .JPEG, EXIF-rotated phone
photos and plain garbage. ``load_rgb`` turns every readable one into the RGB image a viewer would
show and raises ``BadImageError`` (with the path and a reason a person can act on) for the rest,
so that callers can skip the file instead of crashing a long run.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# The same cap Pillow warns at (about 89 megapixels): far above any photo in ImageNet, far below
# what a crafted "decompression bomb" header declares.
DEFAULT_MAX_PIXELS = 89_478_485

# Transparent pixels are laid over the ImageNet mean colour: it normalises to about zero, so a
# transparent area reads as "nothing" to the network rather than as black or white.
BACKGROUND_RGB = (124, 116, 104)


class BadImageError(Exception):
    """A file that cannot be used as a training image; ``reason`` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DecodedImage(NamedTuple):
    image: Image.Image  # 8-bit RGB, upright
    format: str  # as stored ("JPEG", "PNG"...), whatever the file's name says
    mode: str  # as stored ("CMYK", "I;16", "P"...)


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, upright as a viewer would show it.

    The format is read from the file's content, not its name. Raises ``BadImageError`` for empty,
    truncated, corrupt or non-image files and for images over ``max_pixels`` pixels (checked from
    the header, before any pixel is decoded).
    """
    return decode_file(path, max_pixels).image


def decode_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """``load_rgb`` that also tells the stored format and colour mode."""
    path = Path(path)
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images over twice its MAX_IMAGE_PIXELS itself; a user who asked for
        # bigger images gets them (this is the one place imgrec changes a Pillow setting).
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_pixel_count(path, img.size, max_pixels)
                img.load()
                stored_format, stored_mode = img.format or "", img.mode
                return DecodedImage(to_rgb(ImageOps.exif_transpose(img)), stored_format, stored_mode)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own hard cap, hit before ours can look
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(declared.group(1)):,} pixels declared" if declared else str(exc)
        raise BadImageError(path, f"too many pixels: {count}, over the limit (a decompression bomb, or a huge image)") from None
    except Image.UnidentifiedImageError:
        if _starts_like_an_image(path):  # e.g. a PNG cut off after its header: Pillow can't open it
            raise BadImageError(
                path, "truncated or corrupt image data: it starts like an image file but its header is incomplete"
            ) from None
        raise BadImageError(path, "not an image: Pillow recognises no image format in it") from None
    except FileNotFoundError:
        raise BadImageError(path, "file not found (moved or deleted after the scan?)") from None
    except PermissionError:
        raise BadImageError(path, "permission denied: make the file readable") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for broken data
        message = str(exc) or type(exc).__name__
        raise BadImageError(path, f"truncated or corrupt image data: {message}") from None


def _starts_like_an_image(path: Path) -> bool:
    """Whether the file's first bytes match a format Pillow knows (its signature check only)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(16)
    except OSError:
        return False
    Image.init()
    for _factory, accept in Image.OPEN.values():
        try:
            if accept is not None and accept(prefix):
                return True
        except Exception:
            continue
    return False


def check_pixel_count(path: str | os.PathLike, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImageError(path, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(
            path,
            f"too many pixels: {width}x{height} = {width * height:,} is over the limit of "
            f"{max_pixels:,} (a decompression bomb, or a huge image: raise --max-pixels to allow it)",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the usual traps.

    Alpha is composited over ``BACKGROUND_RGB`` (a plain ``convert("RGB")`` drops it, which shows
    transparent areas as whatever colour happens to be stored there, often black); 16- and 32-bit
    integer images are scaled to 0..255 (``convert`` would clip everything above 255 to white).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(img), top=65535.0)
    if mode in ("I", "F"):
        return _grey_to_rgb(np.asarray(img), top=None)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND_RGB)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _grey_to_rgb(array: np.ndarray, top: float | None) -> Image.Image:
    """Map high-bit-depth grey onto 0..255 by its nominal range ``top``, not by clipping.

    Without a known range (Pillow's 32-bit "I" and float "F" modes), values up to 1.0 are taken as
    floats in [0, 1], up to 255 as 8-bit data, anything larger as 16-bit data.
    """
    if top is None:
        peak = float(np.nanmax(array, initial=0.0))
        top = 1.0 if array.dtype.kind == "f" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
    scaled = np.nan_to_num(array.astype(np.float64) * (255.0 / top))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
