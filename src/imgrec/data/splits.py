"""The train and val splits of a dataset root: two ImageFolders, or two sets of WebDataset shards,
checked to share one class list so that an index means the same class in both."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgrec.data.folder import DatasetError, ImageFolderDataset, find_classes, some_names
from imgrec.data.shards import ShardDataset, is_shard_source


@dataclass
class DatasetSplits:
    train: Any  # ImageFolderDataset or imgrec.data.shards.ShardDataset
    val: Any

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def split_dirs(root: str | os.PathLike) -> tuple[Path, Path]:
    """``root/train`` and ``root/val``, or an error that says what the layout must be."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist: expected {root}/train/<class>/... and {root}/val/<class>/...")
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise DatasetError(
            f"dataset root {root} has no {' and no '.join(m + '/' for m in missing)} folder: "
            f"an ImageNet-style root holds train/<class>/... and val/<class>/... "
            f"(raw ILSVRC val images with a labels file are a separate case)"
        )
    return root / "train", root / "val"


def check_same_classes(train_classes: list[str], val_classes: list[str], root: str | os.PathLike) -> None:
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {some_names(only_train)}")
        if only_val:
            parts.append(f"only in val/: {some_names(only_val)}")
        raise DatasetError(
            f"train/ and val/ in {root} have different classes ({'; '.join(parts)}). "
            f"Both splits need the same class folders, so that indices mean the same class in each."
        )


def load_splits(
    root: str | os.PathLike,
    train_transform: Callable[[Any], Any] | None = None,
    eval_transform: Callable[[Any], Any] | None = None,
    *,
    val_root: str | os.PathLike | None = None,
    seed: int = 0,
    **dataset_options: Any,
) -> DatasetSplits:
    """The train and val datasets of a dataset root, checked to share one class list.

    ``root`` holds ``train/`` and ``val/``, each an ImageFolder or a folder of WebDataset shards
    (``imgrec shards``). Or ``root`` is itself a shard source (a folder of shards, a brace
    pattern, a ``pipe:`` command, a URL) for training and ``val_root`` one for validation.
    Training shards are shuffled (shard order, then a buffer) by ``seed`` and the epoch.
    """
    if val_root is None and is_shard_source(root) and not Path(root, "train").is_dir():
        raise DatasetError(f"{root} holds shards: name the validation shards too (--val-data), or pass a root with train/ and val/")
    train_dir, val_dir = (root, val_root) if val_root is not None else split_dirs(root)
    if is_shard_source(train_dir) or is_shard_source(val_dir):
        return _shard_splits(train_dir, val_dir, train_transform, eval_transform, seed, **dataset_options)
    train_classes, val_classes = find_classes(train_dir), find_classes(val_dir)
    check_same_classes(train_classes, val_classes, root)
    train = ImageFolderDataset(train_dir, train_transform, classes=train_classes, **dataset_options)
    train.seed = seed
    val = ImageFolderDataset(val_dir, eval_transform, classes=train_classes, **dataset_options)
    return DatasetSplits(train=train, val=val)


SHARD_SHUFFLE_BUFFER = 2000  # samples per worker: about 100 MB of encoded ImageNet JPEGs


def _shard_splits(train_source, val_source, train_transform, eval_transform, seed: int, **options: Any) -> DatasetSplits:
    shard_options = {k: v for k, v in options.items() if k in ("max_pixels", "skip_log")}
    train = ShardDataset(train_source, train_transform, shuffle=SHARD_SHUFFLE_BUFFER, seed=seed, **shard_options)
    val = ShardDataset(val_source, eval_transform, **shard_options)
    if train.classes != val.classes:
        check_same_classes(train.classes, val.classes, f"{train_source} and {val_source}")
        raise DatasetError(
            f"the shards of {train_source} and {val_source} number the classes differently: "
            f"write the val shards with --classes <train shards>/classes.json"
        )
    return DatasetSplits(train=train, val=val)


__all__ = ["SHARD_SHUFFLE_BUFFER", "DatasetSplits", "check_same_classes", "load_splits", "split_dirs"]
