"""Shared fixtures: tiny image folders built in tmp_path, including every odd file users have."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefiles import photo, write_odd_files


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, set[str], set[str]]:
    """A dataset root with train/val classes, one class folder full of odd files."""
    root = tmp_path / "odd"
    good, bad = write_odd_files(root / "train" / "odd")
    for split in ("train", "val"):
        cls = root / split / "plain"
        cls.mkdir(parents=True)
        for i in range(3):
            photo(50, 40, 100 + i).save(cls / f"p{i}.jpg")
    (root / "val" / "odd").mkdir()
    photo(50, 40, 200).save(root / "val" / "odd" / "ok.jpg")
    return root, good, bad
