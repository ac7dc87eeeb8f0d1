"""ImageFolder datasets (``ROOT/<class>/**/image``) that skip bad files instead of crashing.

The layout is torchvision's and ImageNet's: one folder per class, classes sorted by name, any
depth of sub-folders inside a class. A dataset root holds ``train/`` and ``val/`` with the same
classes. A file that fails to decode is logged (path and reason, once) and replaced by the next
good sample, so a handful of broken files never ends a long run; too many of them (more than
``max_bad_fraction`` of the dataset) is a clear error, because then something is wrong with the
data rather than with a few files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgrec.data.decode import DEFAULT_MAX_PIXELS, BadImageError, load_sample
from imgrec.utils import atomic_write, write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_BAD_FRACTION = 0.01
CLASS_NAMES_FILE = "class_names.json"


class DatasetError(ValueError):
    """The dataset as a whole is unusable (missing root, empty class, mismatched splits...)."""


def is_image_file(name: str) -> bool:
    """True for a visible file with an image extension, in any letter case."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def iter_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files below ``folder`` at any depth, hidden files and folders left out, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, name) for name in filenames if is_image_file(name))
    return sorted(found)


def find_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder root: its visible sub-folders, sorted."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root} {what}: pass a folder laid out as ROOT/<class>/<images>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"no class folders in {root}: images must sit in one sub-folder per class, "
            f"as in {root}/<class>/<image>.jpg"
        )
    return classes


def scan_image_folder(
    root: str | os.PathLike, classes: list[str] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image below ``root``, and the class names in index order.

    ``classes`` fixes the class list (and so the indices), e.g. to make ``val/`` use the indices of
    ``train/``; by default it is every sub-folder of ``root``. A class folder without images is an
    error: an empty class would silently never be predicted.
    """
    root = Path(root)
    classes = find_classes(root) if classes is None else list(classes)
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        files = iter_image_files(root / name)
        if not files:
            empty.append(name)
        samples.extend((str(f), index) for f in files)
    if empty:
        raise DatasetError(
            f"{len(empty)} class folder(s) in {root} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}, any case): {some_names(empty)}. Add images or remove the folder(s)."
        )
    return samples, classes


class SkipLog:
    """The bad files met while loading, one JSON line each, shared by all DataLoader workers.

    Each worker holds its own copy of the dataset, so an in-memory list would only see one
    worker's share. Appending a short line to one file is atomic on local file systems, so the
    file collects every worker's records and any process can read the total. Each worker writes
    a file at most once; ``entries()`` also de-duplicates across workers and epochs.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            path = Path(tempfile.gettempdir(), f"imgrec-skipped-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl")
        self.path = Path(path)
        self._written: set[str] = set()

    def record(self, path: str, reason: str) -> None:
        if path in self._written:
            return
        self._written.add(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"path": path, "reason": reason}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def entries(self) -> dict[str, str]:
        """{path: reason} for every distinct bad file recorded so far, by any process."""
        if not self.path.exists():
            return {}
        seen: dict[str, str] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                seen.setdefault(entry["path"], entry["reason"])
        return seen

    def __len__(self) -> int:
        return len(self.entries())

    def write(self, entries: dict[str, str]) -> None:
        """Replace the file by ``entries`` ({path: reason}), one line each; only while no worker writes to it."""
        if entries:
            text = "".join(json.dumps({"path": path, "reason": reason}) + "\n" for path, reason in entries.items())
            atomic_write(self.path, lambda f: f.write(text.encode("utf-8")))


class ImageFolderDataset:
    """A map-style dataset of (image, class index) over ``ROOT/<class>/**/image``.

    ``transform`` receives an RGB PIL image (the presets in ``imgrec.data.transforms`` return
    uint8 CHW tensors). A file that cannot be decoded is recorded in ``skip_log`` and replaced by
    the next good sample in index order, so every index always yields a sample.

    The random augmentation of sample ``index`` in epoch ``epoch`` (``set_epoch``) draws from a
    torch generator seeded by (``seed``, epoch, index) alone, not from a loader worker's stream:
    the same crop whichever worker, rank or resumed run reads it.
    """

    seed = 0  # the run's seed (load_splits sets the training set's); with the epoch, it fixes every augmentation
    epoch = 0

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        *,
        classes: list[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        skip_log: SkipLog | None = None,
        replace_bad: bool = True,
    ):
        self.root = Path(root)
        self.samples, self.classes = scan_image_folder(self.root, classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bad_fraction = max_bad_fraction
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.replace_bad = replace_bad

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[Any, int]:
        """Decode and transform sample ``index``; raises ``BadImageError`` if its file is bad."""
        path, label = self.samples[index]
        with seeded_augmentation(self.seed, self.epoch, index):
            return load_sample(path, self.transform, self.max_pixels), label

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """Sample ``index``; a bad file is replaced by the next good sample (training), or gives
        ``None`` when ``replace_bad`` is off (evaluation: every image counts once, bad ones not at
        all; ``imgrec.data.loader.collate_images`` drops them from the batch)."""
        if not self.replace_bad:
            try:
                return self.load(index)
            except BadImageError as exc:
                self._skip(exc)
                return None
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            try:
                return self.load(candidate)
            except BadImageError as exc:
                self._skip(exc)
        raise DatasetError(f"no readable image in {self.root}: every file failed to decode")

    def _skip(self, exc: BadImageError) -> None:
        self.skip_log.record(exc.path, exc.reason)
        # Count only this dataset's files: train and val may share one log.
        if getattr(self, "_paths", None) is None:
            self._paths = {path for path, _ in self.samples}
        bad = sum(1 for path in self.skip_log.entries() if path in self._paths)
        if bad > self.max_bad_fraction * len(self.samples):
            raise DatasetError(
                f"{bad} of {len(self.samples)} files in {self.root} are unreadable, more than the "
                f"allowed {self.max_bad_fraction:.1%} (max_bad_fraction); the latest: {exc}. "
                f"Run `imgrec verify {self.root}` to list them all; fix or remove them, or raise the limit."
            )

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


@contextlib.contextmanager
def seeded_augmentation(*key: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``key`` (seed, epoch, sample...), and
    give the caller's generator back unchanged afterwards (a loader without workers draws its
    samples in the training process, whose own random stream must not move)."""
    import torch  # here, not at the top: `imgrec verify` and the CLI's start need no torch

    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(part)) % 2**63
    generator = torch.default_generator  # torch.manual_seed would also seed every accelerator: 100x slower
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


def class_balanced_subset(targets: list[int], fraction: float, seed: int = 0) -> list[int]:
    """Indices of ``fraction`` of the samples of every class (at least one each), chosen by ``seed``.

    Each class keeps ``max(1, round(fraction * n))`` of its ``n`` samples, drawn by a generator
    seeded with ``seed``: the same seed picks the same images on every machine. Sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(index)
    keep: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        keep.extend(rng.sample(members, max(1, round(fraction * len(members)))))
    return sorted(keep)


def take_fraction(dataset: Any, fraction: float, seed: int) -> None:
    """Keep a class-balanced ``fraction`` of a folder dataset's samples, chosen by ``seed`` (in place)."""
    if not hasattr(dataset, "samples"):
        raise ValueError("--train-fraction needs a folder dataset (shards are read as a stream): pass an ImageFolder root")
    keep = class_balanced_subset(dataset.targets, fraction, seed)
    dataset.samples = [dataset.samples[i] for i in keep]


def read_class_names(root: str | os.PathLike) -> dict[str, str] | None:
    """Human-readable names of the classes (``class_names.json``: folder name -> words), if the
    dataset root has them (``imgrec prepare imagenet`` writes it)."""
    path = Path(root, CLASS_NAMES_FILE) if Path(root).is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}): fix it, or delete it to use the folder names") from None
    if not isinstance(names, dict):
        raise DatasetError(f"{path} must hold a JSON object mapping class folder names to human-readable names")
    return {str(k): str(v) for k, v in names.items()}


def some_names(names: list[str], limit: int = 10) -> str:
    """The first ``limit`` names for an error message, with an ellipsis when there are more."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def write_class_index(path: str | os.PathLike, classes: list[str]) -> None:
    """Save the class-to-index mapping as JSON ({"classes": [...], "class_to_idx": {...}})."""
    write_json(path, {"classes": list(classes), "class_to_idx": {name: i for i, name in enumerate(classes)}})


def read_class_index(path: str | os.PathLike) -> list[str]:
    return list(json.loads(Path(path).read_text(encoding="utf-8"))["classes"])
