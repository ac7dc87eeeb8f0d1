"""load_rgb / decode_file: every readable image becomes upright 8-bit RGB, the rest BadImageError."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagefiles import png_chunk, png_header
from imgrec.data.decode import BACKGROUND_RGB, BadImageError, decode_file, load_rgb, load_sample, to_rgb
from imgrec.data.decode_crop import CenterCropDecode
from imgrec.data.transforms import EvalTransform


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def assert_close(actual, expected, tol: int) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), f"{actual} not within {tol} of {expected}"


def assert_rgb8(img: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size
    assert np.asarray(img).dtype == np.uint8
    assert np.asarray(img).shape == (size[1], size[0], 3)


# ----------------------------------------------------------------------------- readable images


@pytest.mark.parametrize(
    "cmyk, expected",
    [
        ((255, 0, 0, 0), (0, 255, 255)),  # pure cyan
        ((0, 255, 255, 0), (255, 0, 0)),  # red
    ],
)
def test_cmyk_jpeg_decodes_to_rgb_colour(tmp_path, cmyk, expected):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 12), cmyk).save(path, "JPEG", quality=95)
    decoded = decode_file(path)
    assert decoded.format == "JPEG"
    assert decoded.mode == "CMYK"
    assert_rgb8(decoded.image, (16, 12))
    assert_close(pixel(decoded.image, (8, 6)), expected, tol=12)


def test_greyscale_L(tmp_path):
    path = tmp_path / "grey.png"
    array = np.zeros((10, 20), np.uint8)
    array[:, 10:] = 200
    array[0, 0] = 37
    Image.fromarray(array, "L").save(path)
    img = load_rgb(path)
    assert_rgb8(img, (20, 10))
    assert pixel(img, (0, 0)) == (37, 37, 37)
    assert pixel(img, (5, 5)) == (0, 0, 0)
    assert pixel(img, (15, 5)) == (200, 200, 200)


def make_palette_image(size=(8, 4)) -> Image.Image:
    img = Image.new("P", size, 0)
    palette = [0] * 768
    palette[0:3] = [250, 10, 10]  # index 0: red
    palette[3:6] = [10, 10, 250]  # index 1: blue
    palette[6:9] = [0, 0, 0]  # index 2: black (used as the transparent entry)
    img.putpalette(palette)
    for x in range(size[0] // 2, size[0]):
        for y in range(size[1]):
            img.putpixel((x, y), 1)
    img.putpixel((0, 0), 2)
    return img


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    make_palette_image().save(path)
    decoded = decode_file(path)
    assert decoded.mode == "P"
    img = decoded.image
    assert_rgb8(img, (8, 4))
    assert pixel(img, (1, 1)) == (250, 10, 10)
    assert pixel(img, (6, 2)) == (10, 10, 250)
    assert pixel(img, (0, 0)) == (0, 0, 0)  # black is a colour here, not transparency


@pytest.mark.parametrize("fmt, name", [("PNG", "palette.png"), ("GIF", "palette.gif")])
def test_palette_with_transparency_entry(tmp_path, fmt, name):
    path = tmp_path / name
    make_palette_image().save(path, fmt, transparency=2)
    decoded = decode_file(path)
    assert decoded.format == fmt
    img = decoded.image
    assert_rgb8(img, (8, 4))
    assert pixel(img, (0, 0)) == BACKGROUND_RGB  # the transparent entry shows the background
    assert pixel(img, (1, 1)) == (250, 10, 10)
    assert pixel(img, (6, 2)) == (10, 10, 250)


def test_rgba_transparent_pixels_become_background(tmp_path):
    path = tmp_path / "rgba.png"
    array = np.zeros((6, 10, 4), np.uint8)  # all fully transparent black
    array[:, 5:] = (20, 180, 60, 255)  # right half opaque green
    Image.fromarray(array, "RGBA").save(path)
    decoded = decode_file(path)
    assert decoded.mode == "RGBA"
    img = decoded.image
    assert_rgb8(img, (10, 6))
    assert pixel(img, (1, 1)) == BACKGROUND_RGB
    assert pixel(img, (1, 1)) != (0, 0, 0)
    assert pixel(img, (8, 3)) == (20, 180, 60)


def test_la_transparent_pixels_become_background(tmp_path):
    path = tmp_path / "la.png"
    array = np.zeros((6, 10, 2), np.uint8)
    array[:, 5:] = (90, 255)  # right half opaque grey 90
    Image.fromarray(array, "LA").save(path)
    decoded = decode_file(path)
    assert decoded.mode == "LA"
    img = decoded.image
    assert_rgb8(img, (10, 6))
    assert pixel(img, (0, 0)) == BACKGROUND_RGB
    assert pixel(img, (9, 5)) == (90, 90, 90)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    array = np.full((4, 6), 32768, np.uint16)
    array[0, 0] = 65535
    array[3, 5] = 0
    Image.fromarray(array).save(path)
    decoded = decode_file(path)
    assert decoded.mode.startswith("I;16")
    img = decoded.image
    assert_rgb8(img, (6, 4))
    assert_close(pixel(img, (2, 2)), (128, 128, 128), tol=1)
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (5, 3)) == (0, 0, 0)


def test_to_rgb_scales_32bit_integer_mode():
    img = Image.fromarray(np.array([[0, 32768, 65535]], np.int32), "I")
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert [pixel(rgb, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_png_named_jpeg_is_read_by_content(tmp_path):
    path = tmp_path / "actually_png.JPEG"
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path, "PNG")
    decoded = decode_file(path)
    assert decoded.format == "PNG"
    assert_rgb8(decoded.image, (7, 5))
    assert pixel(decoded.image, (3, 3)) == (1, 2, 3)


def test_webp(tmp_path):
    path = tmp_path / "img.webp"
    Image.new("RGB", (24, 16), (200, 40, 40)).save(path, "WEBP", lossless=True)
    decoded = decode_file(path)
    assert decoded.format == "WEBP"
    assert_rgb8(decoded.image, (24, 16))
    assert pixel(decoded.image, (12, 8)) == (200, 40, 40)


def test_one_by_one_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 99, 199)).save(path)
    img = load_rgb(path)
    assert_rgb8(img, (1, 1))
    assert pixel(img, (0, 0)) == (9, 99, 199)


def test_very_wide_image_keeps_size(tmp_path):
    path = tmp_path / "wide.png"
    array = np.zeros((20, 2000, 3), np.uint8)
    array[:, 1000:] = (255, 255, 0)
    Image.fromarray(array).save(path)
    img = load_rgb(path)
    assert_rgb8(img, (2000, 20))
    assert pixel(img, (10, 10)) == (0, 0, 0)
    assert pixel(img, (1999, 19)) == (255, 255, 0)


RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize(
    "orientation, top_colour, bottom_colour",
    [
        (6, RED, BLUE),  # stored rotated 90 deg CCW; viewer rotates 90 CW: left half -> top
        (8, BLUE, RED),  # viewer rotates 90 CCW: left half -> bottom
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, top_colour, bottom_colour):
    width, height = 64, 32
    stored = Image.new("RGB", (width, height), RED)
    stored.paste(BLUE, (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone_{orientation}.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:  # the file really carries the tag and the stored size
        assert raw.getexif()[0x0112] == orientation
        assert raw.size == (width, height)

    img = load_rgb(path)
    assert_rgb8(img, (height, width))  # swapped
    assert_close(pixel(img, (height // 2, width // 4)), top_colour, tol=30)
    assert_close(pixel(img, (height // 2, 3 * width // 4)), bottom_colour, tol=30)


# ----------------------------------------------------------------------------- bad files


def _valid_jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _empty(path):
    path.write_bytes(b"")


def _truncated_jpeg(path):
    data = _valid_jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _text(path):
    path.write_text("this is not an image, just some notes\n" * 20)


def _header_only_png(path):
    path.write_bytes(png_header(16, 16))


def _bomb_png(path):
    width = height = 60_000
    row = b"\x00" + b"\x00" * width  # filter byte + pixels of the first row only
    idat = zlib.compress(row, 9)
    path.write_bytes(
        png_header(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, make, reason_part",
    [
        ("empty.jpg", _empty, "empty file"),
        ("truncated.jpg", _truncated_jpeg, "truncated or corrupt"),
        ("random.jpg", _random_bytes, "not an image"),
        ("notes.jpg", _text, "not an image"),
        ("header_only.png", _header_only_png, "truncated or corrupt"),
        ("bomb.png", _bomb_png, "too many pixels"),
    ],
)
def test_bad_file_raises_bad_image_error(tmp_path, name, make, reason_part):
    path = tmp_path / name
    make(path)
    if name == "bomb.png":
        assert path.stat().st_size < 100_000  # a small file that declares 3.6 gigapixels
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert reason_part in info.value.reason
    assert str(path) in str(info.value)


def test_max_pixels_below_image_size_is_rejected(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (10, 10), (5, 5, 5)).save(path)
    with pytest.raises(BadImageError) as info:
        load_rgb(path, max_pixels=99)
    assert info.value.path == str(path)
    assert "too many pixels" in info.value.reason
    assert "10x10" in info.value.reason
    # exactly at the limit is fine
    assert load_rgb(path, max_pixels=100).size == (10, 10)


def test_missing_file_is_bad_image_error(tmp_path):
    path = tmp_path / "gone.jpg"
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert "file not found" in info.value.reason


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_bad_image_error(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (3, 3)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(BadImageError) as info:
            load_rgb(path)
        assert "permission denied" in info.value.reason
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("fast", [False, True])
def test_an_os_error_reading_one_file_is_a_bad_image(tmp_path: Path, fast: bool) -> None:
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)  # reading it raises OSError(ELOOP), a stand-in for EIO
    transform = CenterCropDecode(16) if fast else EvalTransform(img_size=16)
    with pytest.raises(BadImageError):
        load_sample(loop, transform)
