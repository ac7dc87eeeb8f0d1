"""Decode-and-crop pipelines: a file in, a uint8 CHW crop out, decoding only what the crop needs.

The standard pipeline decodes every pixel of a JPEG, turns it into a PIL image, resizes it, then
crops most of it away. Here the crop is chosen first, on the image's size read from its header;
libjpeg-turbo then decodes the JPEG at the smallest DCT scale (1/1, 1/2, 1/4 or 1/8) that still
covers the crop at the output size, and one resize turns the crop into the output. Images stay
uint8 (normalisation happens on the device, ``imgrec.data.transforms.BatchNormalize``).

Only the power-of-two scales are used: libjpeg-turbo's other scales (3/4, 5/8...) run without
SIMD and were slower than a full decode here. Files that are not baseline/progressive RGB or grey
JPEGs (PNG, WebP, CMYK JPEGs, JPEGs libjpeg-turbo rejects as corrupt) take the ordinary robust
path (``imgrec.data.decode.load_rgb``), then the same crop and resize, so every file a user has
still works and a broken one still gives a ``BadImageError`` with the reason.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from imgrec.data.decode import DEFAULT_MAX_PIXELS, EncodedImage, ImageSource, check_pixel_count, load_rgb, read_image_bytes

DCT_SCALES = (8, 4, 2, 1)  # the denominators libjpeg-turbo decodes with SIMD, largest first
JPEG_COLOURS = ("YCbCr", "Gray", "RGB")  # colour spaces libjpeg-turbo converts to RGB itself
PIL_FILTERS = {
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
}


class CropBox:
    """A crop in the upright image's pixels, whether to mirror it, and the image's size."""

    __slots__ = ("top", "left", "height", "width", "flip", "size")

    def __init__(self, top: float, left: float, height: float, width: float, flip: bool = False, size: tuple[int, int] = (0, 0)):
        self.top, self.left, self.height, self.width, self.flip, self.size = top, left, height, width, flip, size


class DecodeCrop:
    """Base of the decode-and-crop pipelines: ``crop_box`` says where, ``__call__`` does the rest.

    ``takes_source`` tells the datasets (``imgrec.data.decode.load_sample``) to hand over the file
    rather than a decoded image.
    """

    takes_source = True

    def __init__(self, size: int, interpolation: str = "bilinear", fast_dct: bool = False):
        self.size = (size, size)
        self.interpolation = InterpolationMode(interpolation)  # "bilinear", "bicubic", "nearest"
        self.fast_dct = fast_dct

    def crop_box(self, height: int, width: int) -> CropBox:
        raise NotImplementedError

    def __call__(self, source: ImageSource | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """The crop of a file, an ``EncodedImage``, or an RGB PIL image already decoded."""
        if isinstance(source, Image.Image):
            return self.resize_crop(np.asarray(source), self.crop_box(source.height, source.width))
        encoded = read_image_bytes(source)
        header = jpeg_header(encoded.data)
        if header is not None:
            height, width, orientation = header
            check_pixel_count(encoded.name, (width, height), max_pixels)
            upright = (width, height) if orientation >= 5 else (height, width)
            box = self.crop_box(*upright)
            scale = dct_scale(box, self.size)
            try:
                array = simplejpeg.decode_jpeg(
                    encoded.data, colorspace="RGB", fastdct=self.fast_dct, fastupsample=self.fast_dct,
                    min_height=-(-height // scale), min_width=-(-width // scale),
                )  # fmt: skip
            except ValueError:  # corrupt or unusual: Pillow decodes what can be decoded, or says why not
                array = None
            if array is not None:
                # Decoded pixel k covers stored pixels [k * scale, (k + 1) * scale): the last one may
                # be partial (sizes round up), so the scale is exactly 1/scale, and on an axis that
                # the EXIF orientation reverses the partial pixel comes first, shifting the grid.
                return self.resize_crop(orient(array, orientation), box, 1 / scale, partial_pixel_offset(height, width, scale, orientation))
        image = load_rgb(EncodedImage(*encoded), max_pixels)
        return self.resize_crop(np.asarray(image), self.crop_box(image.height, image.width))

    def resize_crop(self, array: np.ndarray, box: CropBox, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        """Cut ``box`` (in original pixels; ``array`` is the image at ``scale`` times that size,
        shifted by ``offset`` original pixels) out of an HWC array, resize it, mirror it if asked.

        A box on whole pixels of ``array`` goes through torch's SIMD uint8 resize. One that is
        not (a DCT-scaled decode of a box that is not a multiple of the scale) goes through
        Pillow's resize, which takes a fractional box, so that the crop is where the box says,
        not up to half a decoded pixel off (on photos that offset alone cost 2-3 grey levels).
        """
        top, left = (box.top + offset[0]) * scale, (box.left + offset[1]) * scale
        height, width = box.height * scale, box.width * scale
        bottom, right = top + height, left + width
        if all(abs(v - round(v)) < 1e-6 for v in (top, left, bottom, right)):
            region = array[round(top) : round(bottom), round(left) : round(right)]
            out = resize_uint8(hwc_to_tensor(region), self.interpolation, size=self.size)
        else:
            image = Image.fromarray(np.ascontiguousarray(array))
            resized = image.resize(self.size[::-1], PIL_FILTERS[self.interpolation], box=(left, top, right, bottom))
            out = hwc_to_tensor(np.asarray(resized))
        return out.flip(-1) if box.flip else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size[0]}, interpolation={self.interpolation.value})"


class RandomResizedCropDecode(DecodeCrop):
    """RandomResizedCrop + horizontal flip, decoding at the crop's scale; uint8 CHW out.

    The crop is drawn exactly as torchvision's ``RandomResizedCrop`` draws it (same function,
    same torch random stream), on the upright image's size. ``fast_dct`` (on by default for
    training) uses libjpeg-turbo's faster IDCT and chroma upsampling: about 10% less decode time
    for differences of a grey level or two, well inside the augmentation's own noise.
    ``augment``, if given, runs on the uint8 crop (TrivialAugment, RandAugment, rotation).
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bilinear",
        fast_dct: bool = True,
        augment=None,
    ):
        super().__init__(size, interpolation, fast_dct)
        self.scale, self.ratio, self.hflip, self.augment = list(scale), list(ratio), hflip, augment

    def crop_box(self, height: int, width: int) -> CropBox:
        # get_params only reads the size of what it is given: an empty tensor of the image's size.
        top, left, h, w = RandomResizedCrop.get_params(torch.empty((0, height, width)), self.scale, self.ratio)
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        return CropBox(top, left, h, w, flip)

    def __call__(self, source: ImageSource | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        crop = super().__call__(source, max_pixels)
        return self.augment(crop) if self.augment is not None else crop


class CenterCropDecode(DecodeCrop):
    """The eval transform (shorter side to ``floor(size / crop_pct)``, centre crop ``size``) in one step.

    Decodes at the smallest DCT scale that still covers the centre crop, then resizes only the
    part of the image from its top-left corner to the crop's far edge, with the reference's exact
    scale factor: pixel for pixel the grid of torchvision's Resize + CenterCrop, without
    resizing the margins below and right of the crop.
    """

    def __init__(self, size: int, *, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        super().__init__(size, interpolation, fast_dct=False)
        self.resize_size = math.floor(size / crop_pct)

    def resized(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The size torchvision's Resize(resize_size) gives, and where CenterCrop(size) cuts it."""
        if height <= width:
            resized = (self.resize_size, int(self.resize_size * width / height))
        else:
            resized = (int(self.resize_size * height / width), self.resize_size)
        return resized, (int(round((resized[0] - self.size[0]) / 2.0)), int(round((resized[1] - self.size[1]) / 2.0)))

    def crop_box(self, height: int, width: int) -> CropBox:
        (rh, rw), (top, left) = self.resized(height, width)
        sy, sx = height / rh, width / rw
        return CropBox(top * sy, left * sx, self.size[0] * sy, self.size[1] * sx, size=(height, width))

    def resize_crop(self, array: np.ndarray, box: CropBox, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        if offset != (0.0, 0.0):  # the grid does not start at the array's corner: the fractional-box path
            return super().resize_crop(array, box, scale, offset)
        height, width = box.size
        (rh, rw), (top, left) = self.resized(height, width)
        fy, fx = rh / (height * scale), rw / (width * scale)  # output pixels per pixel of ``array``
        # Enough rows and columns for the kept output and its filter's reach (2 taps each side for bicubic).
        rows = min(array.shape[0], math.ceil((top + self.size[0]) / fy + 2 / min(fy, 1.0) + 2))
        cols = min(array.shape[1], math.ceil((left + self.size[1]) / fx + 2 / min(fx, 1.0) + 2))
        out = resize_uint8(hwc_to_tensor(array[:rows, :cols]), self.interpolation, scale=(fy, fx))
        return out[:, top : top + self.size[0], left : left + self.size[1]]


def hwc_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A CHW uint8 tensor over a contiguous, writable copy of an HWC array (rows copy fast)."""
    contiguous = np.ascontiguousarray(array)
    if not contiguous.flags.writeable:  # a PIL image's own pixels
        contiguous = contiguous.copy()
    return torch.from_numpy(contiguous).permute(2, 0, 1)


def resize_uint8(image: torch.Tensor, mode: InterpolationMode, *, size=None, scale=None) -> torch.Tensor:
    """Resize a CHW uint8 image in HWC memory with torch's SIMD uint8 kernels, to ``size`` or by ``scale``.

    ``scale`` (output pixels per input pixel, per axis) is used exactly, not rounded to a size.
    The batch dimension is given the stride of the whole image so that torch allocates the output
    channels_last too (pytorch#68430), which also saves it a re-packing copy.
    """
    c, h, w = image.shape
    if size is not None and (h, w) == tuple(size):
        return image
    if scale is not None:
        # torch sizes the output floor(h * scale): 64 / 117 * 117 is 63.99999... A relative nudge
        # of 1e-9 keeps whole products whole and moves the sampling grid by far less than a pixel.
        scale = tuple(f * (1 + 1e-9) for f in scale)
    batch = image.as_strided((1, c, h, w), (image.numel(), *image.stride()))
    smooth = mode != InterpolationMode.NEAREST
    out = torch.nn.functional.interpolate(
        batch, size=size, scale_factor=scale, mode=mode.value if smooth else "nearest-exact",  # pixel centres, as Pillow
        antialias=smooth, align_corners=False if smooth else None,
        recompute_scale_factor=False if scale is not None else None,
    )  # fmt: skip
    return out[0]


def partial_pixel_offset(height: int, width: int, scale: int, orientation: int) -> tuple[float, float]:
    """Where the upright image starts in a DCT-scaled decode, in original pixels per upright axis.

    A stored side of ``n`` pixels decodes to ``ceil(n / scale)`` pixels, the last one partial. An
    EXIF orientation that reverses an upright axis (rows: 3, 4, 7, 8; columns: 2, 3, 6, 7) puts
    that partial pixel first, so the image starts ``ceil(n / scale) * scale - n`` pixels into it.
    """
    rows, cols = (height, width) if orientation < 5 else (width, height)
    padding = lambda n: -(-n // scale) * scale - n  # noqa: E731
    return (float(padding(rows)) if orientation in (3, 4, 7, 8) else 0.0, float(padding(cols)) if orientation in (2, 3, 6, 7) else 0.0)


def dct_scale(box: CropBox, size: tuple[int, int]) -> int:
    """The largest DCT scale denominator at which ``box`` still holds ``size`` pixels or more."""
    for scale in DCT_SCALES:
        if box.height / scale >= size[0] and box.width / scale >= size[1]:
            return scale
    return 1


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, EXIF orientation) of a JPEG libjpeg-turbo can decode to RGB, else ``None``."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colour, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colour not in JPEG_COLOURS:
        return None
    return height, width, exif_orientation(data)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1-8) of a JPEG, 1 when absent or unreadable.

    Reads only the markers before the image data; a few microseconds, where opening the file with
    Pillow to ask would cost more than the decode saves on small crops.
    """
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: no more metadata
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            return _tiff_orientation(segment[6:])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == 0x0112 and kind in (3, 4):  # Orientation: a SHORT, or (rarely) a LONG
                (value,) = struct.unpack(order + ("H" if kind == 3 else "I"), tiff[entry + 8 : entry + (10 if kind == 3 else 12)])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded HWC array upright per its EXIF orientation (views, no copy)."""
    if orientation in (2, 4, 5, 7):  # the mirrored ones: undo the mirror first
        array = array[:, ::-1] if orientation in (2, 5) else array[::-1]
    # Rotations left to do, in quarter turns anticlockwise, after the mirror.
    turns = {3: 2, 4: 0, 5: 1, 6: 3, 7: 1, 8: 1}.get(orientation, 0)
    return np.rot90(array, turns) if turns else array
