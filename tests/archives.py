"""Miniature ILSVRC-2012 archives with the real structure, for the tests of ``imgrec prepare
imagenet`` and of training from them (not a test module itself): a train tar of per-class tars,
a val tar, a devkit with meta.mat and the ground truth."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from imgrec.data.prepare import DEVKIT_ARCHIVE, TRAIN_ARCHIVE, VAL_ARCHIVE

LEAVES = [  # (ILSVRC2012_ID, wnid, words, colour)
    (1, "n03000002", "church, church building", (200, 30, 30)),
    (2, "n01000001", "tench, Tinca tinca", (30, 200, 30)),
    (3, "n02000003", "goldfish, Carassius auratus", (30, 30, 200)),
]
NON_LEAVES = [(4, "n00001740", "entity", [5]), (5, "n00002137", "abstraction, abstract entity", [1, 2, 3])]
TRAIN_PER_CLASS = 3
VAL_LABELS = [3, 1, 2, 2, 3, 1, 1]  # ground truth, one id per val image in sorted name order
WNID_OF = {i: wnid for i, wnid, _, _ in LEAVES}


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return buffer.getvalue()


def meta_mat() -> bytes:
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    rows = [(i, w, words, f"gloss of {w}", 0, np.zeros(0), 0, TRAIN_PER_CLASS) for i, w, words, _ in LEAVES]
    rows += [(i, w, words, "a node", len(kids), np.array(kids, dtype=float), 2, 0) for i, w, words, kids in NON_LEAVES]
    rows = [rows[k] for k in (3, 1, 0, 4, 2)]  # the file's order is not the id order either
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def build_archives(src: Path, *, val_labels: list[int] = VAL_LABELS, inner_names: dict[str, str] | None = None,
                   extra_train: dict[str, bytes] | None = None, devkit_files: tuple[str, ...] = ("meta", "gt")) -> dict:  # fmt: skip
    """The three archives in ``src``; returns {"train": {wnid: {name: bytes}}, "val": {name: (wnid, bytes)}}."""
    src.mkdir(parents=True, exist_ok=True)
    train = {
        wnid: {f"{wnid}_{k + 1}.JPEG": jpeg((r, g, (b + 40 * k) % 256)) for k in range(TRAIN_PER_CLASS)}
        for _, wnid, _, (r, g, b) in LEAVES
    }
    outer = {
        f"{wnid}.tar": tar_bytes({(inner_names or {}).get(n, n): d for n, d in files.items()}) for wnid, files in train.items()
    }
    (src / TRAIN_ARCHIVE).write_bytes(tar_bytes({**outer, **(extra_train or {})}))
    colours = {i: c for i, _, _, c in LEAVES}
    val = {}
    for k, label in enumerate(VAL_LABELS):
        r, g, b = colours[label]
        val[f"ILSVRC2012_val_{k + 1:08d}.JPEG"] = (WNID_OF[label], jpeg((r, (g + 25 * k) % 256, b)))
    # Written in reverse order: the labels follow sorted names, not the archive's order.
    (src / VAL_ARCHIVE).write_bytes(tar_bytes({name: data for name, (_, data) in reversed(val.items())}))
    with tarfile.open(src / DEVKIT_ARCHIVE, "w:gz") as tar:
        add_file(tar, "ILSVRC2012_devkit_t12/COPYING", b"licence")
        add_file(tar, "ILSVRC2012_devkit_t12/evaluation/demo_eval.m", b"% matlab")
        if "meta" in devkit_files:
            add_file(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        if "gt" in devkit_files:
            text = "".join(f"{label}\n" for label in val_labels)
            add_file(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", text.encode())
    return {"train": train, "val": val}
