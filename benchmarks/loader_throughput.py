"""Images/s of the input pipeline: torchvision's reference vs imgrec's decode-and-crop vs decode alone.

Builds (once, cached) an ImageNet-like corpus: JPEG photos of 500x375 (or 375x500), quality 90,
cut at random places and scales from scikit-image's sample photographs (astronaut, coffee,
chelsea, rocket, Hubble deep field, retina, immunohistochemistry, motorcycle), so that the
decoder sees photographic content, not flat colours. Then, through a DataLoader with 1 and 2
workers (batch 64), interleaved, median of ``--runs`` passes:

  train  (a) torchvision ImageFolder + RandomResizedCrop(224) + flip + ToTensor + Normalize
         (b) imgrec: ImageFolderDataset + RandomResizedCropDecode, uint8 channels_last batches
  eval   (a) torchvision ImageFolder + Resize(256) + CenterCrop(224) + ToTensor + Normalize
         (b) imgrec: ImageFolderDataset + CenterCropDecode, uint8 channels_last batches
  floor  (c) read + decode every pixel (libjpeg-turbo through simplejpeg), nothing else

    python benchmarks/loader_throughput.py [--images 1000] [--runs 5] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from imgrec.config import DataConfig
from imgrec.data.decode import read_image_bytes
from imgrec.data.folder import ImageFolderDataset
from imgrec.data.loader import create_loader
from imgrec.data.transforms import eval_transform, train_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "stereo_motorcycle")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photographs() -> list[Image.Image]:
    from skimage import data

    photos = []
    for name in PHOTOS:
        array = getattr(data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
        if array.ndim == 3 and array.shape[2] == 3:
            photos.append(Image.fromarray(array))
    return photos


def build_corpus(root: Path, images: int, seed: int = 0) -> Path:
    """``root/<photo>/<n>.jpg``: ``images`` JPEGs of 500x375 or 375x500 at quality 90 (cached)."""
    done = root / f".complete-{images}"
    if done.exists():
        return root
    photos, rng = photographs(), np.random.default_rng(seed)
    for i in range(images):
        k = i % len(photos)
        photo = photos[k]
        portrait = rng.random() < 0.25
        aspect = 3 / 4 if portrait else 4 / 3
        width, height = photo.size
        w = int(min(width, height * aspect) * rng.uniform(0.4, 1.0))
        h = int(w / aspect)
        x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        size = (375, 500) if portrait else (500, 375)
        image = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / PHOTOS[k]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", "JPEG", quality=90)
    done.touch()
    return root


class DecodeOnly:
    """The floor: read the file and decode every pixel, return nothing worth collating."""

    takes_source = True

    def __call__(self, source, max_pixels=None) -> torch.Tensor:
        array = simplejpeg.decode_jpeg(read_image_bytes(source).data)
        return torch.tensor(array.shape[0])


def loaders(root: Path, workers: int, batch: int) -> dict[str, DataLoader]:
    config = DataConfig(img_size=224, crop_pct=0.875, interpolation="bilinear")
    reference = {
        "train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
        "eval": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]),
    }
    ours = {"train": train_transform(config, "fast"), "eval": eval_transform(config, "fast")}
    options = {"batch_size": batch, "num_workers": workers, "persistent_workers": True, "prefetch_factor": 4}
    result = {}
    for split in ("train", "eval"):
        dataset = torchvision.datasets.ImageFolder(str(root), reference[split])
        result[f"{split} (a) torchvision"] = DataLoader(dataset, shuffle=split == "train", **options)
        ours_dataset = ImageFolderDataset(root, ours[split])
        result[f"{split} (b) imgrec"] = create_loader(
            ours_dataset, batch_size=batch, train=split == "train", num_workers=workers, persistent_workers=True, channels_last=True
        )
    result["decode only (c)"] = create_loader(ImageFolderDataset(root, DecodeOnly()), batch_size=batch, train=True, num_workers=workers, persistent_workers=True)
    return result


def one_pass(loader: DataLoader) -> float:
    count, started = 0, time.perf_counter()
    for images, _labels in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="runs/bench/loader_corpus", help="where the JPEG corpus is cached")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = build_corpus(Path(args.corpus), args.images)
    cpu = platform.processor() or platform.machine()
    print(f"{args.images} JPEGs 500x375 q90 in {root}; {cpu}, {torch.get_num_threads()} thread, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {datetime.date.today()}; images/s, median of {args.runs} passes")  # fmt: skip
    table = {}
    for workers in args.workers:
        named = loaders(root, workers, args.batch)
        for loader in named.values():  # start the workers, warm the page cache
            one_pass(loader)
        rates: dict[str, list[float]] = {name: [] for name in named}
        for _ in range(args.runs):
            for name, loader in named.items():  # interleaved: noise hits every pipeline alike
                rates[name].append(one_pass(loader))
        table[workers] = {name: statistics.median(values) for name, values in rates.items()}
        del named
    names = list(next(iter(table.values())))
    print(f"{'pipeline':28s}" + "".join(f"{f'{w} worker(s)':>16s}" for w in table))
    for name in names:
        print(f"{name:28s}" + "".join(f"{table[w][name]:16.0f}" for w in table))
    for split in ("train", "eval"):
        for w in table:
            ours, ref, floor = table[w][f"{split} (b) imgrec"], table[w][f"{split} (a) torchvision"], table[w]["decode only (c)"]
            print(f"{split}, {w} worker(s): imgrec / torchvision = {ours / ref:.2f}x; imgrec / decode-only = {ours / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
