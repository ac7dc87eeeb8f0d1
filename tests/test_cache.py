"""The small-data fast path: images decoded once into memory, cropped and flipped in batches.

Its crops must follow torchvision's RandomResizedCrop in distribution, be a pure function of
(seed, epoch, image) (exact resume, any rank layout), and its images must be the files' pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from imagefiles import make_class_folders, photo
from imgrec import distributed
from imgrec.config import DataConfig
from imgrec.data.cache import (
    DRAWS,
    BatchedRandomResizedCrop,
    CachedEvalLoader,
    CachedTrainLoader,
    ImageCache,
    ResizeShorter,
    cache_plan,
    keyed_uniforms,
)
from imgrec.data.decode import load_rgb
from imgrec.data.folder import ImageFolderDataset, SkipLog
from imgrec.data.stats import DataStats
from imgrec.data.transforms import EvalTransform


@pytest.mark.parametrize("size, scale", [((375, 500), (0.08, 1.0)), ((32, 32), (0.35, 1.0)), ((8, 8), (0.08, 1.0)), ((20, 300), (0.08, 1.0))])
def test_the_batched_crops_follow_torchvision_in_distribution(size: tuple[int, int], scale: tuple[float, float]) -> None:
    height, width = size
    n = 20_000
    ours = BatchedRandomResizedCrop(16, scale=scale).boxes(torch.full((n,), height), torch.full((n,), width), keyed_uniforms(0, 1, torch.arange(n), DRAWS))
    ours = torch.stack(ours[:4], dim=1).numpy()
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), scale, (3 / 4, 4 / 3)) for _ in range(n)], dtype=float)
    for column, name in enumerate(("top", "left", "height", "width")):
        for q in (10, 50, 90):
            a, b = np.percentile(ours[:, column], q), np.percentile(theirs[:, column], q)
            assert abs(a - b) <= max(1.0, 0.03 * max(height, width)), (name, q, a, b)
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) <= max(0.15, 0.01 * max(height, width)), name
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all() and (ours >= 0).all()


def test_the_flip_rate_is_hflip() -> None:
    n = 20_000
    flips = BatchedRandomResizedCrop(16, hflip=0.3).boxes(torch.full((n,), 64), torch.full((n,), 64), keyed_uniforms(5, 2, torch.arange(n), DRAWS))[4]
    assert abs(flips.float().mean().item() - 0.3) < 0.015
    none = BatchedRandomResizedCrop(16, hflip=0.0).boxes(torch.full((n,), 64), torch.full((n,), 64), keyed_uniforms(5, 2, torch.arange(n), DRAWS))[4]
    assert not none.any()


def test_the_numbers_of_an_image_depend_on_seed_epoch_and_image_alone() -> None:
    everything = keyed_uniforms(3, 7, torch.arange(100), DRAWS)
    assert everything.dtype == torch.float64 and (everything >= 0).all() and (everything < 1).all()
    subset = torch.tensor([42, 5, 99, 5])
    assert torch.equal(keyed_uniforms(3, 7, subset, DRAWS), everything[subset])  # any subset, any order, any rank
    assert not torch.equal(keyed_uniforms(3, 8, torch.arange(100), DRAWS), everything)  # another epoch
    assert not torch.equal(keyed_uniforms(4, 7, torch.arange(100), DRAWS), everything)  # another seed
    assert abs(everything.mean().item() - 0.5) < 0.01 and abs(everything.std().item() - (1 / 12) ** 0.5) < 0.01


def test_a_box_is_resampled_as_torchvision_resizes_the_crop() -> None:
    image = torch.from_numpy(np.array(photo(60, 40, 3).filter(ImageFilter.GaussianBlur(2)))).permute(2, 0, 1).contiguous()
    canvas = torch.zeros(1, 3, 50, 70, dtype=torch.uint8)
    canvas[0, :, :40, :60] = image  # the image in the top-left corner of a larger canvas, as the cache holds it
    crop = BatchedRandomResizedCrop(32, interpolation="bilinear")
    box = [torch.tensor([v], dtype=torch.float64) for v in (5, 12, 24, 30)]
    ours = crop.resample(canvas, *box, torch.tensor([False]))[0]
    reference = F.resized_crop(image, 5, 12, 24, 30, [32, 32], antialias=False)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 32, 32)
    assert (ours.float() - reference.float()).abs().mean() < 1.5
    flipped = crop.resample(canvas, *box, torch.tensor([True]))[0]
    assert torch.equal(flipped, ours.flip(-1))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    make_class_folders(root, {"a": 5, "b": 4})
    Image.new("RGB", (80, 30), (200, 10, 10)).save(root / "b" / "wide.png")  # a larger, wide one: resized, aspect kept
    (root / "a" / "broken.jpg").write_bytes(b"not an image")
    return root


def test_the_cache_holds_each_readable_image_once_as_its_file_decodes(folder: Path, tmp_path: Path) -> None:
    log = SkipLog(tmp_path / "skipped.jsonl")
    dataset = ImageFolderDataset(folder, skip_log=log, max_bad_fraction=0.5)
    cache = ImageCache(dataset, side=15, interpolation="bilinear", device=torch.device("cpu"), workers=0)
    readable = [(path, label) for path, label in dataset.samples if not path.endswith("broken.jpg")]
    assert len(cache) == len(readable) and cache.labels.tolist() == [label for _, label in readable]
    assert list(log.entries()) == [str(folder / "a" / "broken.jpg")]
    resize = ResizeShorter(15, "bilinear")
    for row, (path, _) in enumerate(readable):
        expected = resize(load_rgb(path))
        h, w = cache.sizes[row].tolist()
        assert (h, w) == tuple(expected.shape[1:]) and torch.equal(cache.images[row, :, :h, :w], expected)
    assert tuple(cache.sizes[-1].tolist()) == (15, 40)  # 80x30 shrunk to a shorter side of 15: 40x15; the 12x10 photos keep their size
    assert tuple(cache.sizes[0].tolist()) == (10, 12)


def test_training_batches_follow_the_epoch_order_resume_and_ranks(folder: Path, monkeypatch) -> None:
    dataset = ImageFolderDataset(folder, max_bad_fraction=0.5)
    cache = ImageCache(dataset, side=15, interpolation="bilinear", device=torch.device("cpu"), workers=0)
    crop = BatchedRandomResizedCrop(8, scale=(0.35, 1.0))

    def epoch(batch: int, skipped: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = CachedTrainLoader(cache, crop, batch_size=batch, seed=2)
        loader.dataset.set_epoch(3)
        loader.sampler.set_epoch(3)
        loader.sampler.skip(skipped)
        return list(loader)

    straight = epoch(2)
    assert len(straight) == len(cache) // 2 and straight[0][0].dtype == torch.uint8 and straight[0][0].shape == (2, 3, 8, 8)
    assert straight[0][0].is_contiguous(memory_format=torch.channels_last)
    again = epoch(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(straight, again))
    resumed = epoch(2, skipped=4)  # after two steps
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, straight[2:]))
    whole = torch.cat([images for images, _ in epoch(4)])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(torch.cat([images for images, _ in epoch(2)]))
    interleaved = torch.stack(shares, dim=1).flatten(0, 1)  # rank r of 2 reads positions r, r + 2, ...
    assert torch.equal(interleaved, whole[: len(interleaved)])
    on_rank_1 = ImageCache(dataset, side=15, interpolation="bilinear", device=torch.device("cpu"), workers=0)
    assert len(on_rank_1) == len(cache) and torch.equal(on_rank_1.images, cache.images)  # every rank holds every image
    eval_set = ImageFolderDataset(folder, EvalTransform(img_size=8, crop_pct=1.0), max_bad_fraction=0.5, replace_bad=False)
    shown = torch.cat([labels for _, labels in CachedEvalLoader(eval_set, batch_size=2, device=torch.device("cpu"), workers=0)])
    assert shown.tolist() == cache.labels.tolist()[1::2]  # rank 1 of 2 scores every other image of the whole set


def test_the_eval_cache_holds_the_eval_transform_of_every_readable_image(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, EvalTransform(img_size=8, crop_pct=1.0), max_bad_fraction=0.5, replace_bad=False)
    loader = CachedEvalLoader(dataset, batch_size=3, device=torch.device("cpu"), workers=0)
    images = torch.cat([batch for batch, _ in loader])
    readable = [(p, label) for p, label in dataset.samples if not p.endswith("broken.jpg")]
    assert images.shape == (len(readable), 3, 8, 8)
    assert torch.equal(images[0], EvalTransform(img_size=8, crop_pct=1.0)(load_rgb(readable[0][0])))


def test_the_cache_is_used_when_it_fits_and_says_why_not_otherwise() -> None:
    cpu = torch.device("cpu")
    small = DataStats(1000, 10, 100, 100, 32, 32, 1.0)
    assert cache_plan(small, DataConfig(img_size=32), cpu, None)[0] is True
    huge = DataStats(10_000_000, 1000, 10_000, 10_000, 500, 375 * 2, 0.0)
    fits, why = cache_plan(huge, DataConfig(img_size=224), cpu, None)
    assert not fits and "over the cache budget" in why
    assert cache_plan(small, DataConfig(img_size=32), cpu, False) == (False, "--no-cache")
    assert "auto-augment" in cache_plan(small, DataConfig(img_size=32, auto_augment="trivial"), cpu, None)[1]
    assert "not known" in cache_plan(DataStats(1000, 10, 0, 0, None, None, 0.0), DataConfig(), cpu, None)[1]
