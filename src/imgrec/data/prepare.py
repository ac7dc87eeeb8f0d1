"""ILSVRC-2012 from the archives image-net.org serves to ``train/<wnid>/`` and ``val/<wnid>/`` folders.

This is the work done once, before any training process starts. It reads, from one folder SRC:
``ILSVRC2012_devkit_t12.tar.gz`` (required: ``data/meta.mat`` names the 1000 classes and maps
their ids to WordNet ids, ``data/ILSVRC2012_validation_ground_truth.txt`` gives each val image's
class id), ``ILSVRC2012_img_train.tar`` (a tar of 1000 per-class tars) and
``ILSVRC2012_img_val.tar`` (50,000 flat images); either image archive may be absent, and that split
is then skipped. It writes the torchvision/timm layout that ``load_splits`` reads:
``OUT/train/<wnid>/<name>.JPEG``, ``OUT/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` and
``OUT/class_names.json`` ({wnid: words}).

The archives are large (138 GB and 6.4 GB), so nothing but their lists of member headers is held
in memory: each image is copied from the tar to ``<name>.tmp`` and renamed into place, so an
interrupted run never leaves a partial image under its final name, and a finished class gets a
``.complete`` marker that a re-run honours without reading the class's data again. Re-running is
therefore both the way to resume and a no-op once everything is there. Member names are checked
before use (no absolute paths, no ``..``), and only regular image files are written.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from imgrec.data.folder import CLASS_NAMES_FILE, DatasetError, is_image_file
from imgrec.utils import write_json

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
META_MEMBER = "data/meta.mat"
GROUND_TRUTH_MEMBER = "data/ILSVRC2012_validation_ground_truth.txt"
DOWNLOAD_URL = "https://image-net.org/download-images"
COMPLETE_MARKER = ".complete"
MAX_CLASS_ID = 1000
WNID = re.compile(r"n\d{8}")
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class PreparedImageNet:
    """What ``prepare_imagenet`` found and wrote; ``already_present`` images were left untouched."""

    out: Path
    train_images: int
    val_images: int
    classes: int
    already_present: int
    skipped_splits: tuple[str, ...] = ()

    @property
    def written(self) -> int:
        return self.train_images + self.val_images - self.already_present


@dataclass(frozen=True)
class Devkit:
    """The devkit's contents that matter: class id -> wnid, wnid -> words, and val labels by line."""

    wnids: dict[int, str]
    words: dict[str, str]
    val_labels: list[int]


def prepare_imagenet(
    src: str | os.PathLike, out: str | os.PathLike, *, console: Console | None = None, progress: bool = True
) -> PreparedImageNet:
    """Unpack the ILSVRC-2012 archives in ``src`` into an ImageFolder root ``out``; resumable."""
    src, out = Path(src), Path(out)
    console = console or Console(soft_wrap=True)
    train_tar, val_tar, devkit_tar = src / TRAIN_ARCHIVE, src / VAL_ARCHIVE, src / DEVKIT_ARCHIVE
    check_sources(src)
    devkit = read_devkit(devkit_tar)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(sorted(devkit.words.items()))
    names_path = out / CLASS_NAMES_FILE
    if not names_path.exists() or json.loads(names_path.read_text(encoding="utf-8")) != names:  # leave an identical file alone
        write_json(names_path, names)

    show = progress and console.is_terminal
    counts = {"train": (0, 0), "val": (0, 0)}
    skipped = []
    for split, archive, extract in (("train", train_tar, extract_train), ("val", val_tar, extract_val)):
        if not archive.is_file():
            skipped.append(split)
            console.print(
                f"skipped {split}: {archive} is not there (get it from {DOWNLOAD_URL})", style="yellow", highlight=False
            )
            continue
        with _archive_progress(console, split, archive, show) as advance:
            total, present = extract(archive, out / split, devkit, advance)
        counts[split] = (total, present)
        console.print(f"{split}: {total:,} images in {out / split} ({present:,} already present)", highlight=False)
    console.print(f"class names: {names_path} ({len(devkit.words)} classes)", highlight=False)
    return PreparedImageNet(
        out=out, train_images=counts["train"][0], val_images=counts["val"][0], classes=len(devkit.words),
        already_present=counts["train"][1] + counts["val"][1], skipped_splits=tuple(skipped),
    )  # fmt: skip


def check_sources(src: Path) -> None:
    """Fail before any work when the devkit, or both image archives, are missing from ``src``."""
    if not src.is_dir():
        raise DatasetError(
            f"source folder {src} does not exist: pass --src, the folder holding {TRAIN_ARCHIVE}, {VAL_ARCHIVE} "
            f"and {DEVKIT_ARCHIVE} as downloaded from {DOWNLOAD_URL}"
        )
    missing = [name for name in (DEVKIT_ARCHIVE,) if not (src / name).is_file()]
    if not (src / TRAIN_ARCHIVE).is_file() and not (src / VAL_ARCHIVE).is_file():
        missing += [TRAIN_ARCHIVE, VAL_ARCHIVE]
    if missing:
        raise DatasetError(
            f"missing from {src}: {', '.join(missing)}. Download them from {DOWNLOAD_URL} (ILSVRC2012: the "
            f"development kit, and the training and/or validation images) and put them in {src} unrenamed."
        )


def read_devkit(path: Path) -> Devkit:
    """The leaf classes of ``meta.mat`` and the val ground truth, checked against each other."""
    with _open_tar(path, "r:*") as tar:
        members = {_safe_parts(m.name, path)[-2:]: m for m in tar.getmembers() if m.isreg()}
        raw = {}
        for wanted in (META_MEMBER, GROUND_TRUTH_MEMBER):
            member = members.get(tuple(wanted.split("/")))
            if member is None:
                raise DatasetError(
                    f"{path} has no {wanted} (looked for ILSVRC2012_devkit_t12/{wanted}): it is not the "
                    f"ILSVRC2012 development kit (Task 1 & 2) or it is damaged; download it again from {DOWNLOAD_URL}"
                )
            raw[wanted] = _read_member(tar, member, path)
    wnids, words = _leaf_classes(raw[META_MEMBER], path)
    where = f"{path}:{GROUND_TRUTH_MEMBER}"
    labels = []
    for line_number, line in enumerate(raw[GROUND_TRUTH_MEMBER].decode("ascii", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            label = int(line)
        except ValueError:
            raise DatasetError(f"{where} line {line_number} is {line.strip()!r}, not a class id; the devkit is damaged") from None
        if label not in wnids:
            raise DatasetError(
                f"{where} line {line_number} names class id {label}, outside the {len(wnids)} classes of meta.mat "
                f"(ids 1..{MAX_CLASS_ID} with no children); the devkit is damaged or not ILSVRC2012's"
            )
        labels.append(label)
    return Devkit(wnids=wnids, words=words, val_labels=labels)


def _leaf_classes(meta: bytes, path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """({ILSVRC2012_ID: wnid}, {wnid: words}) for the leaf synsets (the classes with images)."""
    import numpy as np
    import scipy.io

    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"])
        rows = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["words"], synsets["num_children"])
        leaves = [
            (int(i), str(w), str(words)) for i, w, words, children in rows if int(children) == 0 and 1 <= int(i) <= MAX_CLASS_ID
        ]
    except (scipy.io.matlab.MatReadError, KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise DatasetError(f"cannot read {path}:{META_MEMBER} ({type(exc).__name__}: {exc}); download the devkit again") from None
    bad = [w for _, w, _ in leaves if not WNID.fullmatch(w)]
    if not leaves or bad or len({i for i, _, _ in leaves}) != len(leaves) or len({w for _, w, _ in leaves}) != len(leaves):
        raise DatasetError(
            f"{path}:{META_MEMBER} has no usable class list (leaf synsets with unique ids and wnids like n01440764)"
        )
    return {i: w for i, w, _ in leaves}, {w: words for _, w, words in leaves}


def extract_train(archive: Path, out: Path, devkit: Devkit, advance: Callable[[int], None]) -> tuple[int, int]:
    """Every per-class tar of the train archive into ``out/<wnid>/``; returns (images, already present).

    All member names are checked before anything is written. A class with a ``.complete`` marker
    is not read at all (random access: the outer tar is a plain file, so its data is seeked past).
    """
    known = set(devkit.words)
    total = present = 0
    with _open_tar(archive, "r:*") as tar:
        classes = []
        for member in tar.getmembers():
            if not member.isreg():
                continue
            name = _safe_parts(member.name, archive)[-1]
            wnid = name.removesuffix(".tar")
            if not name.endswith(".tar") or wnid not in known:
                raise DatasetError(
                    f"{archive} holds {member.name!r}, not <wnid>.tar for a class of the devkit's meta.mat; "
                    f"is it {TRAIN_ARCHIVE} of ILSVRC2012 (and the devkit its t12 one)? Nothing was written for train."
                )
            classes.append((wnid, member))
        for wnid, member in classes:
            images, already = _extract_class(tar, member, archive, out / wnid, advance)
            total, present = total + images, present + already
            advance(member.offset_data + member.size)
    return total, present


def _extract_class(
    tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, folder: Path, advance: Callable[[int], None]
) -> tuple[int, int]:
    marker = folder / COMPLETE_MARKER
    try:
        images = int(json.loads(marker.read_text(encoding="utf-8"))["images"])
        return images, images
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker (or a damaged one): do the class, skipping the files already in place
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    where = Path(f"{archive}:{member.name}")
    images = present = 0
    try:
        with tarfile.open(fileobj=tar.extractfile(member), mode="r|") as inner:
            for info in inner:
                if not info.isreg():
                    continue
                parts = _safe_parts(info.name, where)
                if not is_image_file(parts[-1]):
                    continue
                target = folder.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                if _is_present(target, info.size):
                    present += 1
                else:
                    _copy_member(inner, info, target)
                images += 1
                advance(member.offset_data + info.offset_data + info.size)
    except (tarfile.TarError, EOFError) as exc:
        raise DatasetError(f"{where} is damaged ({exc}); download {TRAIN_ARCHIVE} again, then rerun to resume") from None
    write_json(marker, {"images": images})
    return images, present


def extract_val(archive: Path, out: Path, devkit: Devkit, advance: Callable[[int], None]) -> tuple[int, int]:
    """The val images into ``out/<wnid>/``, labelled by ground-truth line in sorted name order.

    The ground truth's line i belongs to the i-th val image in sorted order (as torchvision and
    the devkit read it), so the count is checked against the archive before anything is written.
    """
    with _open_tar(archive, "r:*") as tar:
        members = {}
        for member in tar.getmembers():
            if not member.isreg():
                continue  # only regular files are written; a link or device member is never followed
            name = _safe_parts(member.name, archive)[-1]
            if is_image_file(name):
                if name in members:
                    raise DatasetError(f"{archive} holds two images named {name}; download {VAL_ARCHIVE} again")
                members[name] = member
        if len(members) != len(devkit.val_labels):
            raise DatasetError(
                f"{archive} holds {len(members):,} images but the devkit's ground truth has {len(devkit.val_labels):,} "
                f"lines, one per image; the archive or the devkit is incomplete or from another year: download both again "
                f"from {DOWNLOAD_URL}. Nothing was written for val."
            )
        wnid_of = {name: devkit.wnids[label] for name, label in zip(sorted(members), devkit.val_labels)}
        for wnid in set(wnid_of.values()):
            (out / wnid).mkdir(parents=True, exist_ok=True)
            _remove_leftovers(out / wnid)
        present = 0
        try:
            for name, member in sorted(members.items(), key=lambda item: item[1].offset):  # archive order: sequential reads
                target = out / wnid_of[name] / name
                if _is_present(target, member.size):
                    present += 1
                else:
                    _copy_member(tar, member, target)
                advance(member.offset_data + member.size)
        except (tarfile.TarError, EOFError) as exc:
            raise DatasetError(f"{archive} is damaged ({exc}); download {VAL_ARCHIVE} again, then rerun to resume") from None
    return len(members), present


def _is_present(target: Path, size: int) -> bool:
    """True when ``target`` already holds a file of the member's size: a rerun leaves it alone.

    A file only gets its final name after a complete copy, so the size check is there for what
    a rename cannot guard against: a crash before the data reached the disk.
    """
    try:
        return target.stat().st_size == size
    except FileNotFoundError:
        return False


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Copy one member to ``target`` through ``target.tmp``, so ``target`` is never partial."""
    source = tar.extractfile(member)
    if source is None:
        raise tarfile.ReadError(f"cannot read member {member.name}")
    tmp = target.with_name(target.name + ".tmp")
    with source, open(tmp, "wb") as f:
        shutil.copyfileobj(source, f, COPY_CHUNK)
    os.replace(tmp, target)


def _remove_leftovers(folder: Path) -> None:
    """Delete the ``*.tmp`` files an interrupted run left behind in ``folder`` (any depth)."""
    for leftover in folder.rglob("*.tmp"):
        if leftover.is_file():
            leftover.unlink()


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The parts of a member name, refusing names that would land outside the output folder."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise DatasetError(
            f"{archive} holds a member named {name!r}, which could write outside the output folder; refusing it. "
            f"The archive is not the one {DOWNLOAD_URL} serves: download it again."
        )
    return path.parts


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    source = tar.extractfile(member)
    if source is None:
        raise DatasetError(f"cannot read {member.name} from {archive}; download it again")
    with source:
        return source.read()  # meta.mat and the ground truth are small


@contextmanager
def _open_tar(path: Path, mode: str) -> Iterator[tarfile.TarFile]:
    """``tarfile.open`` with its errors (a truncated or non-tar download) said in a user's words."""
    try:
        with tarfile.open(path, mode) as tar:
            yield tar
    except (tarfile.TarError, EOFError) as exc:  # not OSError: a full disk is no fault of the archive
        raise DatasetError(
            f"{path} is truncated, damaged or not a tar archive ({exc}); download it again, then rerun to resume"
        ) from None


@contextmanager
def _archive_progress(console: Console, split: str, archive: Path, show: bool) -> Iterator[Callable[[int], None]]:
    """A bar over the archive's bytes on a terminal; yields ``advance(position_in_bytes)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not show) as bar:
        total = archive.stat().st_size
        task = bar.add_task(f"{split} {archive.name}", total=total)
        yield lambda position: bar.update(task, completed=position)
        bar.update(task, completed=total)  # the end-of-archive padding is never "read"
