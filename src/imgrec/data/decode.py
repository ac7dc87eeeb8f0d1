"""Decode any image file a user may have into an RGB PIL image, or say precisely why not.

Real datasets hold CMYK JPEGs, 16-bit PNGs, palette GIFs, PNGs named .JPEG, EXIF-rotated phone
photos and plain garbage. ``load_rgb`` turns every readable one into the RGB image a viewer would
show and raises ``BadImageError`` (with the path and a reason a person can act on) for the rest,
so that callers can skip the file instead of crashing a long run.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any, NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps

from imgrec.config import DEFAULT_MAX_PIXELS  # noqa: F401  (the default of every max_pixels below)

# Files are read whole before decoding; a larger "image" (a 2 GB video named .jpg) is refused
# instead of filling a worker's memory. 16-bit PNGs at the pixel limit stay well under it.
MAX_FILE_BYTES = 1 << 30

# Transparent pixels are laid over the ImageNet mean colour: it normalises to about zero, so a
# transparent area reads as "nothing" to the network rather than as black or white.
BACKGROUND_RGB = (124, 116, 104)


class BadImageError(Exception):
    """A file that cannot be used as a training image; ``reason`` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TooManyPixelsError(BadImageError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or a huge image)."""


class EncodedImage(NamedTuple):
    """An encoded image file held in memory (a member of a tar shard, an upload), named for messages."""

    name: str
    data: bytes


# Where an image comes from: a file on disk, or encoded bytes already in memory.
ImageSource = Union[str, os.PathLike, EncodedImage]


def read_image_bytes(source: ImageSource) -> EncodedImage:
    """The name and encoded bytes of ``source``; a missing, unreadable or empty file is a ``BadImageError``."""
    if isinstance(source, EncodedImage):
        encoded = source
    else:
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_FILE_BYTES:
                    raise BadImageError(source, f"file of {size:,} bytes, over the {MAX_FILE_BYTES:,} bytes an image may have")
                encoded = EncodedImage(str(source), f.read())
        except FileNotFoundError:
            raise BadImageError(source, "file not found (moved or deleted after the scan?)") from None
        except PermissionError:
            raise BadImageError(source, "permission denied: make the file readable") from None
        except IsADirectoryError:
            raise BadImageError(source, "a folder, not an image file") from None
        except OSError as exc:  # a bad sector, a stale network mount...: this file, not the run
            raise BadImageError(source, f"cannot read the file: {exc.strerror or exc}") from None
    if not encoded.data:
        raise BadImageError(encoded.name, "empty file (0 bytes)")
    return encoded


def load_sample(source: ImageSource, transform: Any = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """One dataset sample: ``transform`` of the decoded RGB image.

    A transform that decodes by itself (``takes_source = True``: the decode-and-crop pipelines of
    ``imgrec.data.decode_crop``) gets the source and ``max_pixels`` instead, so that it can
    choose how much of the file to decode.
    """
    if getattr(transform, "takes_source", False):
        return transform(source, max_pixels)
    image = load_rgb(source, max_pixels)
    return transform(image) if transform is not None else image


class DecodedImage(NamedTuple):
    image: Image.Image  # 8-bit RGB, upright
    format: str  # as stored ("JPEG", "PNG"...), whatever the file's name says
    mode: str  # as stored ("CMYK", "I;16", "P"...)


def load_rgb(path: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` (a file, or an ``EncodedImage`` in memory) as an 8-bit RGB image, upright as a viewer would show it.

    The format is read from the file's content, not its name. Raises ``BadImageError`` for empty,
    truncated, corrupt or non-image files and for images over ``max_pixels`` pixels (checked from
    the header, before any pixel is decoded).
    """
    return decode_file(path, max_pixels).image


def decode_file(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """``load_rgb`` that also tells the stored format and colour mode."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images over twice its MAX_IMAGE_PIXELS itself; a user who asked for
        # bigger images gets them (this is the one place imgrec changes a Pillow setting).
        Image.MAX_IMAGE_PIXELS = max_pixels
    name, data = read_image_bytes(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_pixel_count(name, img.size, max_pixels)
                img.load()
                stored_format, stored_mode = img.format or "", img.mode
                return DecodedImage(to_rgb(ImageOps.exif_transpose(img)), stored_format, stored_mode)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own hard cap, hit before ours can look
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(declared.group(1)):,} pixels declared" if declared else str(exc)
        raise TooManyPixelsError(name, f"too many pixels: {count}, over the limit (a decompression bomb, or a huge image)") from None
    except Image.UnidentifiedImageError:
        if _starts_like_an_image(data[:16]):  # e.g. a PNG cut off after its header: Pillow can't open it
            raise BadImageError(
                name, "truncated or corrupt image data: it starts like an image file but its header is incomplete"
            ) from None
        raise BadImageError(name, "not an image: Pillow recognises no image format in it") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for broken data
        message = str(exc) or type(exc).__name__
        raise BadImageError(name, f"truncated or corrupt image data: {message}") from None


def _starts_like_an_image(prefix: bytes) -> bool:
    """Whether a file's first bytes match a format Pillow knows (its signature check only)."""
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
        raise TooManyPixelsError(
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
