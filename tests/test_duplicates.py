"""Duplicate finding: exact copies by bytes, near copies (resized, re-encoded) by hash and
thumbnail, inside a split and across splits, the deduplicated list, and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.data.duplicates import Fingerprint, difference_hash, find_duplicates, near_pairs, thumbnail


def test_the_difference_hash_reads_left_to_right_brightness() -> None:
    rising = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))  # brighter to the right everywhere
    assert difference_hash(rising) == 2**64 - 1
    assert difference_hash(rising.transpose(Image.FLIP_LEFT_RIGHT)) == 0


def test_near_pairs_are_every_pair_within_the_bits(monkeypatch) -> None:
    import imgrec.data.duplicates as module

    monkeypatch.setattr(module, "BLOCK", 7)  # blocks that do not divide the count
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 20, dtype=np.uint64)
    hashes = [int(h) for h in base] + [int(h) ^ (1 << 5) ^ (1 << 40) for h in base[:6]]  # six copies 2 bits away
    found = near_pairs(hashes, max_bits=3)
    brute = [(i, j, bin(hashes[i] ^ hashes[j]).count("1")) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if bin(hashes[i] ^ hashes[j]).count("1") <= 3]
    assert sorted(found) == sorted(brute) and {(i, j) for i, j, _ in found} >= {(i, 20 + i) for i in range(6)}


def test_a_shared_hash_with_different_thumbnails_is_not_a_copy() -> None:
    """The hash only names candidates: two different pictures with the same hash stay apart."""
    up = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    pixels = np.array(up)
    pixels[8:] = np.arange(0, 64, 4, dtype=np.uint8)  # the lower half dimmer: the same left-to-right order, another picture
    other = Image.fromarray(pixels)
    assert difference_hash(up) == difference_hash(other)
    files = [Fingerprint(f"{i}.png", "train", str(i), difference_hash(im), thumbnail(im)) for i, im in enumerate((up, other))]
    assert float(files[0].thumbnail.astype(np.float32) @ files[1].thumbnail.astype(np.float32)) < 0.99
    assert find_duplicates(files).groups == []


def scene(seed: int, size: int = 96) -> Image.Image:
    """A picture of coloured rectangles on noise, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, size - 30, 2)
        pixels[y : y + rng.integers(12, 30), x : x + rng.integers(12, 30)] = rng.integers(60, 255, 3)
    return Image.fromarray(pixels)


@pytest.fixture
def leaky(tmp_path) -> Path:
    """train/ and val/ of 2 classes x 6 distinct scenes, then: an exact copy of a train image in
    val, a resized and re-encoded one in val, and a near copy inside train."""
    root = tmp_path / "data"
    for split, seeds in (("train", range(0, 12)), ("val", range(100, 112))):
        for n, seed in enumerate(seeds):
            folder = root / split / ("a" if n % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            scene(seed).save(folder / f"{seed}.png")
    shutil.copy(root / "train/b/0.png", root / "val/b/copy_of_0.png")
    original = Image.open(root / "train/a/1.png")
    original.resize((72, 72), Image.BICUBIC).save(root / "val/a/small_1.jpg", quality=70)
    scene(3).save(root / "train/a/again_3.jpg", quality=80)
    return root


def test_copies_are_found_across_and_inside_splits(leaky) -> None:
    from imgrec.data.verify import verify_folder

    found = verify_folder(leaky, workers=1, duplicates=True).duplicates
    groups = {tuple(str(Path(f).relative_to(leaky)) for f in g.files): g for g in found.groups}
    assert set(groups) == {("train/b/0.png", "val/b/copy_of_0.png"), ("train/a/1.png", "val/a/small_1.jpg"), ("train/a/3.png", "train/a/again_3.jpg")}
    assert groups[("train/b/0.png", "val/b/copy_of_0.png")].exact and groups[("train/b/0.png", "val/b/copy_of_0.png")].across_splits
    assert not groups[("train/a/1.png", "val/a/small_1.jpg")].exact and groups[("train/a/1.png", "val/a/small_1.jpg")].cosine >= 0.99
    assert not groups[("train/a/3.png", "train/a/again_3.jpg")].across_splits
    assert len(found.across) == 2 and len(found.within) == 1
    assert [str(Path(f).relative_to(leaky)) for f in found.redundant()] == ["train/a/again_3.jpg", "val/a/small_1.jpg", "val/b/copy_of_0.png"]


def test_the_command_reports_them_and_writes_the_list(leaky, tmp_path, capsys) -> None:
    from imgrec.cli import main

    keep = tmp_path / "keep.txt"
    assert main(["verify", str(leaky), "--duplicates", "--dedup-list", str(keep), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "duplicates: 2 group(s) across splits" in out and "1 inside a split" in out and "exact, across train/val: train/b/0.png, val/b/copy_of_0.png" in out
    kept = keep.read_text().splitlines()
    assert len(kept) == 24 + 3 - 3 and "val/b/copy_of_0.png" not in kept and "train/b/0.png" in kept
    assert main(["verify", str(leaky), "--duplicates", "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)["duplicates"]
    assert (report["groups"], report["across_splits"], report["files_to_drop"]) == (3, 2, 3)
    assert main(["verify", str(leaky), "--dedup-list", str(keep)]) == 2
    assert "--dedup-list needs --duplicates" in capsys.readouterr().err
