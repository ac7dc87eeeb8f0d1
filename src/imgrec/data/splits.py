"""The train and val splits of a dataset root: two ImageFolders, or two sets of WebDataset shards,
checked to share one class list so that an index means the same class in both; or, for a root of
class folders without ``val/`` (with or without ``train/``), a stratified split drawn by the seed.

A drawn split is recorded (``SplitRecord``, the run's split.json: the val and train files, relative
to the root) so that a resumed run, ``imgrec evaluate`` and the report use the same images. Read
back over a folder that has changed since, the record keeps its val images (those still there),
new images train, and ``DatasetSplits.note`` says what changed: nothing is re-split silently."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrec.data.folder import DatasetError, ImageFolderDataset, find_classes, scan_image_folder, some_names
from imgrec.data.labels import LabelledFiles, labels_file_classes, read_labels_file
from imgrec.data.shards import ShardDataset, is_shard_source
from imgrec.utils import write_json

SPLIT_FILE = "split.json"  # in the run directory: the drawn split's files
DEFAULT_VAL_SPLIT = 0.1  # the fraction of each class held out where the root has no val/


@dataclass
class DatasetSplits:
    train: Any  # ImageFolderDataset, LabelledFiles (a drawn split) or imgrec.data.shards.ShardDataset
    val: Any  # the same, or None: a drawn split with val_split 0 (no validation)
    record: SplitRecord | None = None  # the drawn split, to be written to the run
    note: str = ""  # how the split was made, or what changed in the folder since it was recorded

    @property
    def classes(self) -> list[str]:
        return self.train.classes


@dataclass
class SplitRecord:
    """A drawn split: which files validate, which train ([path relative to ``root``, class] pairs)."""

    root: str
    val_split: float
    seed: int
    classes: list[str]
    val: list[list[str]] = field(default_factory=list)  # [file, class] pairs
    train: list[list[str]] = field(default_factory=list)

    def write(self, path: str | os.PathLike) -> Path:
        return write_json(Path(path), {"format_version": 1, **self.__dict__})

    @classmethod
    def read(cls, path: str | os.PathLike) -> SplitRecord:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{k: values[k] for k in ("root", "val_split", "seed", "classes", "val", "train")})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path} is not a readable split record ({exc}): restore it from the run, or start a new run") from None


def needs_split(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a folder of class folders with no val/ (so the split is drawn)."""
    root = Path(root)
    return root.is_dir() and not (root / "val").is_dir() and not is_shard_source(root)


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val): ``fraction`` of each class's images (rounded; at least one, never all, for a
    class of two or more images and a fraction above 0) to val, chosen by ``seed``."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in sorted(samples):
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label, members in sorted(by_class.items()):
        random.Random(f"{seed}-{label}").shuffle(members)
        k = round(len(members) * fraction)
        if fraction > 0 and len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        val.extend(members[:k])
        train.extend(members[k:])
    return sorted(train), sorted(val)


def drawn_splits(
    root: str | os.PathLike,
    val_split: float,
    seed: int,
    record: str | os.PathLike | None,
    train_transform: Any,
    eval_transform: Any,
    labels: str | os.PathLike | None = None,
    **options: Any,
) -> DatasetSplits:
    """The splits of a root without val/ (its class folders, or its images as the ``labels`` file
    names them): from ``record`` (a split.json) where it exists, else drawn."""
    if not 0 <= val_split < 1:
        raise DatasetError(f"val_split must be in [0, 1), got {val_split}: the fraction of each class held out for validation")
    folder, samples, classes = _labelled_images(Path(root), labels)
    relative = {_rel(path, folder): (path, label) for path, label in samples}
    if record is not None and Path(record).is_file():
        split = SplitRecord.read(record)
        if split.classes != classes:
            raise DatasetError(f"the classes of {folder} differ from those recorded in {record}: resume with the dataset the run was started on")
        held = {name for name, _ in split.val}
        val = [relative[name] for name in sorted(held) if name in relative]
        train = [relative[name] for name in sorted(relative) if name not in held]
        known = held | {name for name, _ in split.train}
        new, gone = len(set(relative) - known), len(known - set(relative))
        note = f"split: {len(val)} val and {len(train)} train images of {folder} as recorded in {record}"
        if new or gone:
            note += f"; the folder has changed since: {new} new image(s) train, {gone} recorded image(s) are gone (not re-split)"
    else:
        train, val = stratified_split(samples, val_split, seed)
        val_pairs, train_pairs = ([[_rel(path, folder), classes[label]] for path, label in part] for part in (val, train))
        split = SplitRecord(str(folder.resolve()), val_split, seed, classes, val_pairs, train_pairs)
        note = (f"split: {folder} has no val/: {len(val)} images ({val_split:g} of each class, seed {seed}) validate, {len(train)} train"
                if val else f"split: {folder} has no val/ and val_split is 0: all {len(train)} images train, no validation")  # fmt: skip
    if split.val_split > 0 and not val:
        raise DatasetError(f"{folder} has no val/ and no class with two or more images to hold one out: add images, or pass --val-split 0 to train without validation")
    train_set = LabelledFiles(train, classes, train_transform, root=folder, **options)
    train_set.seed = seed
    val_set = LabelledFiles(val, classes, eval_transform, root=folder, **options) if val else None
    return DatasetSplits(train=train_set, val=val_set, record=split, note=note)


def _labelled_images(root: Path, labels: str | os.PathLike | None) -> tuple[Path, list[tuple[str, int]], list[str]]:
    """(the images' folder, (path, class index) of each, the classes) of a root to split."""
    if labels is not None:
        classes = labels_file_classes(labels, root)
        return root, read_labels_file(labels, classes, root), classes
    folder = root / "train" if (root / "train").is_dir() else root
    samples, classes = scan_image_folder(folder)
    return folder, samples, classes


def recorded_val(data: str | os.PathLike, record: str | os.PathLike, classes: list[str], transform: Any, **options: Any) -> LabelledFiles | None:
    """The val images ``record`` (a run's split.json) drew from ``data``, labelled with the model's
    ``classes``; None where ``data`` has a val/ or is not the folder the record was drawn from."""
    data, record = Path(data), Path(record)
    if not record.is_file() or not needs_split(data):
        return None
    split = SplitRecord.read(record)
    folder = next((f for f in (data, data / "train") if f.is_dir() and f.resolve() == Path(split.root)), None)
    if folder is None:
        return None
    index = {name: i for i, name in enumerate(classes)}
    samples = [(str(folder / name), index[label]) for name, label in split.val if (folder / name).is_file() and label in index]
    if not samples:
        raise DatasetError(f"none of the {len(split.val)} val images recorded in {record} is left in {folder}: nothing to evaluate")
    return LabelledFiles(samples, classes, transform, root=folder, **options)


def _rel(path: str, folder: Path) -> str:
    return Path(path).relative_to(folder).as_posix()


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
    val_split: float = DEFAULT_VAL_SPLIT,
    split_record: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    **dataset_options: Any,
) -> DatasetSplits:
    """The train and val datasets of a dataset root, checked to share one class list.

    ``root`` holds ``train/`` and ``val/``, each an ImageFolder or a folder of WebDataset shards
    (``imgrec shards``). Or ``root`` is itself a shard source (a folder of shards, a brace
    pattern, a ``pipe:`` command, a URL) for training and ``val_root`` one for validation.
    Training shards are shuffled (shard order, then a buffer) by ``seed`` and the epoch.
    Or ``root`` holds class folders and no ``val/`` (its images directly, or in ``train/``):
    Or ``root`` is a flat folder of images that a ``labels`` file (CSV ``filename,class`` or JSON)
    labels. In these two cases ``val_split`` of each class validates, drawn by ``seed``, or as
    ``split_record`` recorded it (``drawn_splits``).
    """
    if val_root is None and is_shard_source(root) and not Path(root, "train").is_dir():
        raise DatasetError(f"{root} holds shards: name the validation shards too (--val-data), or pass a root with train/ and val/")
    if val_root is None and (labels is not None or needs_split(root)):
        return drawn_splits(root, val_split, seed, split_record, train_transform, eval_transform, labels, **dataset_options)
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


__all__ = [
    "DEFAULT_VAL_SPLIT", "SHARD_SHUFFLE_BUFFER", "SPLIT_FILE", "DatasetSplits", "SplitRecord", "check_same_classes", "drawn_splits", "load_splits",
    "needs_split", "recorded_val", "split_dirs", "stratified_split",
]  # fmt: skip
