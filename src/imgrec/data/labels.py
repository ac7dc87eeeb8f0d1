"""Labelled images that are not an ImageFolder: a flat folder with a labels file, or the class
folders of an evaluation set that holds some of a model's classes.

Labels files come in two forms, told apart by their content: a ``filename,class`` CSV, and
ILSVRC's ground-truth list of one integer per image (``ILSVRC2012_validation_ground_truth.txt``).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgrec.config import DEFAULT_MAX_PIXELS
from imgrec.data.folder import (
    DEFAULT_MAX_BAD_FRACTION,
    DatasetError,
    ImageFolderDataset,
    SkipLog,
    find_classes,
    iter_image_files,
    some_names,
)


class LabelledFiles(ImageFolderDataset):
    """An ``ImageFolderDataset`` over a given list of (path, class index) instead of a folder scan.

    Loading, skipping bad files into ``skip_log`` and the ``max_bad_fraction`` limit are the
    parent's; only where the samples come from differs (a labels file, or the class folders of
    an evaluation set that holds some of the model's classes). ``root`` names the images' folder
    in error messages.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        root: str | os.PathLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        skip_log: SkipLog | None = None,
        replace_bad: bool = False,
    ):
        # The parent's __init__ is skipped on purpose: it would scan root and require every class folder.
        self.root = Path(root)
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bad_fraction = max_bad_fraction
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.replace_bad = replace_bad  # evaluation: a bad file counts nowhere rather than as its neighbour

    def __repr__(self) -> str:
        return f"LabelledFiles({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


def read_labels_file(path: str | os.PathLike, classes: list[str], image_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """(image path, class index) for each image a labels file names, the format read from its content.

    - CSV ``filename,class`` (an optional ``filename,class`` header line is skipped): the filename
      is relative to ``image_dir`` or absolute; the class is one of ``classes`` by name, or else a
      0-based index into ``classes``. A name wins over an index, so numeric folder names work.
    - ILSVRC's ground-truth list (e.g. ``ILSVRC2012_validation_ground_truth.txt``): one integer per
      line, the i-th line labelling the i-th image of ``image_dir`` sorted by name. The integers are
      ILSVRC's 1-based ids, read as positions in ``classes`` (k -> ``classes[k - 1]``), so
      ``classes`` must be in ILSVRC id order for ILSVRC's file.
    """
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise ValueError(f"labels file {path} does not exist: pass a filename,class CSV or an ILSVRC ground-truth list")
    if not image_dir.is_dir():
        raise DatasetError(
            f"image folder {image_dir} does not exist or is not a folder: pass the folder the labels file describes"
        )
    if path.suffix.lower() == ".json":
        return _labelled_rows(path, _json_rows(path), classes, image_dir)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise ValueError(f"labels file {path} is empty: it needs one filename,class line per image, or one integer per image")
    if "," in first:
        return _labelled_rows(path, _csv_rows(path, lines, image_dir), classes, image_dir)
    return _read_integer_list(path, lines, classes, image_dir)


def _csv_rows(path: Path, lines: list[str], image_dir: Path) -> list[tuple[int, str, str]]:
    """(line number, filename, class) of each row of a ``filename,class`` CSV, its header skipped."""
    rows: list[tuple[int, str, str]] = []
    for number, row in enumerate(csv.reader(io.StringIO("\n".join(lines))), start=1):
        fields = [field.strip() for field in row]
        if not any(fields):
            continue
        if not rows and _is_header(fields, image_dir):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}, line {number}: expected 2 columns filename,class, got {len(fields)}: {','.join(row)!r}")
        rows.append((number, fields[0], fields[1]))
    return rows


def _labelled_rows(path: Path, rows: list[tuple[int, str, str]], classes: list[str], image_dir: Path) -> list[tuple[str, int]]:
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    missing: list[tuple[int, str]] = []
    for number, filename, value in rows:
        label = _class_index(value, class_to_idx, classes, where=f"{path}, line {number}")
        image = image_dir / filename
        if filename in seen:
            raise ValueError(
                f"{path}, line {number}: {filename!r} is listed twice (first on line {seen[filename]}); list each image once"
            )
        seen[filename] = number
        if not image.is_file():
            missing.append((number, filename))
        samples.append((str(image), label))
    if missing:
        number, filename = missing[0]
        more = f" ({len(missing) - 1} more listed files are missing too)" if len(missing) > 1 else ""
        raise ValueError(
            f"{path}, line {number}: image {filename!r} not found in {image_dir}{more}. "
            f"Filenames are relative to the image folder (or absolute): check the folder passed with the labels file"
        )
    if not samples:
        raise ValueError(f"labels file {path} is empty: it has a header but no filename,class lines")
    return samples


HEADER_NAMES = {"class", "label", "labels", "category", "target", "y", "species", "breed"}  # a CSV's class column, as Kaggle's files name it


def _is_header(fields: list[str], image_dir: Path) -> bool:
    """A first CSV row that names the columns (``filename,class``, ``id,label``...), not an image."""
    return len(fields) == 2 and fields[1].lower() in HEADER_NAMES and not (image_dir / fields[0]).is_file()


def read_groups_file(path: str | os.PathLike, folders: list[str | os.PathLike] | None = None) -> dict[str, str]:
    """{resolved image path: group} of a ``filename,group`` CSV (any attribute the user has: site,
    scanner, age band...); a first line that names no image is its header. A filename is absolute
    or relative to one of ``folders`` (the folder evaluated, the dataset root), with ``/`` or ``\\``;
    one found in none is an error naming it. Without ``folders`` the file's form alone is checked
    (before a long evaluation) and the rows are returned as they are written."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--groups {path}: no such file; pass a CSV of filename,group lines")
    places = list(dict.fromkeys(str(Path(f)) for f in folders)) if folders is not None else None
    groups: dict[str, str] = {}
    missing: list[tuple[int, str]] = []
    header = None
    for number, row in enumerate(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))), start=1):
        fields = [field.strip() for field in row]
        if not any(fields):
            continue
        if len(fields) != 2 or not all(fields):
            raise ValueError(f"{path}, line {number}: expected 2 columns filename,group, got {','.join(row)!r}")
        name = fields[0].replace("\\", "/")
        if places is None:
            groups[name] = fields[1]
            continue
        found = next((Path(f) / name for f in places if (Path(f) / name).is_file()), None)
        if found is not None:
            groups[str(found.resolve())] = fields[1]
        elif number > 1 or groups:  # a first line that names no image is the header
            missing.append((number, fields[0]))
        else:
            header = fields[0]
    if missing:
        number, name = missing[0]
        more = f" ({len(missing) - 1} more are missing too)" if len(missing) > 1 else ""
        raise ValueError(f"{path}, line {number}: image {name!r} not found in {' or '.join(places)}{more}: filenames are relative to the folder evaluated")
    if not groups:
        first = f" (its first line's {header!r} is not one either)" if header else ""
        raise ValueError(f"{path} names no image{' of ' + ' or '.join(places) if places else ''}{first}: it needs filename,group lines, filenames relative to the folder evaluated")
    return groups


def labels_file_classes(path: str | os.PathLike, image_dir: str | os.PathLike) -> list[str]:
    """The classes a ``filename,class`` CSV (or JSON ``{"filename": "class"}``) names, sorted (as
    numbers where every class is an integer, so that class "10" follows "9")."""
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise ValueError(f"labels file {path} does not exist: pass a filename,class CSV or a JSON object of filename: class")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path, path.read_text(encoding="utf-8-sig").splitlines(), image_dir)
    if not rows:
        raise ValueError(f"labels file {path} is empty: it needs one filename,class line per image")
    values = {value for _, _, value in rows}
    numeric = all(v.lstrip("-").isdigit() for v in values)
    return sorted(values, key=lambda v: (int(v), v) if numeric else (0, v))


def _json_rows(path: Path) -> list[tuple[int, str, str]]:
    """(position, filename, class) of each entry of a JSON labels file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"labels file {path} is not valid JSON ({exc})") from None
    if isinstance(data, list) and all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in data):
        data = dict(data)
    if not isinstance(data, dict) or not data:
        raise ValueError(f'labels file {path} must hold a JSON object {{"filename": "class", ...}} (or a list of [filename, class] pairs)')
    return [(number, str(name), str(value)) for number, (name, value) in enumerate(data.items(), start=1)]


def _class_index(value: str, class_to_idx: dict[str, int], classes: list[str], *, where: str) -> int:
    """The index of a class given by name or by 0-based index, or an error suggesting close names."""
    if value in class_to_idx:
        return class_to_idx[value]
    try:
        index = int(value)
    except ValueError:
        close = difflib.get_close_matches(value, classes, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else f" Known classes: {some_names(classes)}."
        raise ValueError(
            f"{where}: unknown class {value!r}, not one of the model's {len(classes)} classes.{hint} "
            f"(A header line, if any, must read exactly filename,class.)"
        ) from None
    if not 0 <= index < len(classes):
        raise ValueError(
            f"{where}: class index {index} is out of range: the model has {len(classes)} classes, indices 0..{len(classes) - 1}"
        )
    return index


def _read_integer_list(path: Path, lines: list[str], classes: list[str], image_dir: Path) -> list[tuple[str, int]]:
    labels = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        try:
            value = int(text)
        except ValueError:
            what = "is blank" if not text else f"holds {text!r}, not an integer"
            raise ValueError(
                f"{path}, line {number} {what}: a file without commas is read as ILSVRC's ground-truth list, "
                f"one integer class id per line (for filenames use a filename,class CSV)"
            ) from None
        if not 1 <= value <= len(classes):
            raise ValueError(
                f"{path}, line {number}: class id {value} is out of range: ILSVRC ids are 1-based positions in the "
                f"model's {len(classes)} classes, 1..{len(classes)}"
            )
        labels.append(value - 1)
    images = iter_image_files(image_dir)
    if len(images) != len(labels):
        raise ValueError(
            f"{path} has {len(labels)} labels but {image_dir} holds {len(images)} images: an integer list labels "
            f"the folder's images one per line in sorted order, so the counts must match (wrong folder or file?)"
        )
    return [(str(image), label) for image, label in zip(images, labels, strict=True)]


def evaluation_dataset(
    data: str | os.PathLike,
    classes: list[str],
    transform: Callable[[Any], Any] | None,
    *,
    labels: str | os.PathLike | None = None,
    **dataset_options: Any,
) -> LabelledFiles:
    """The images to evaluate a model with ``classes`` on, labelled with the model's class indices.

    With ``labels``, ``data`` is a flat folder described by that file (``read_labels_file``).
    Without, ``data`` is an ImageFolder root, or a dataset root holding ``train/`` and ``val/``
    (then ``val/`` is used). Its class folders must all be classes of the model; model classes
    without a folder are allowed (their per-class count is 0), so a subset can be evaluated.
    ``dataset_options`` are ``max_pixels``, ``max_bad_fraction`` and ``skip_log``.
    """
    data = Path(data)
    if labels is not None:
        return LabelledFiles(read_labels_file(labels, classes, data), classes, transform, root=data, **dataset_options)
    root = data / "val" if (data / "val").is_dir() and (data / "train").is_dir() else data
    folder_classes = find_classes(root)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folder_classes if name not in class_to_idx]
    if unknown:
        raise DatasetError(
            f"{len(unknown)} class folder(s) in {root} are not classes of the model: {some_names(unknown)}. "
            f"The model knows {len(classes)} classes ({some_names(classes, 5)}); "
            f"remove those folders, or evaluate with the model trained on them"
        )
    samples = [(str(f), class_to_idx[name]) for name in folder_classes for f in iter_image_files(root / name)]
    if not samples:
        raise DatasetError(f"no images in the class folders of {root}: nothing to evaluate")
    return LabelledFiles(samples, classes, transform, root=root, **dataset_options)


__all__ = ["LabelledFiles", "evaluation_dataset", "labels_file_classes", "read_groups_file", "read_labels_file"]
