"""Exact and near duplicates in a dataset, inside a split and across splits (``imgrec verify DATA
--duplicates``): the leakage that inflates a validation figure when the same picture, or a
resized or re-encoded copy of it, is both trained on and scored.

Exact copies share their bytes (SHA-256). Near copies are found in two steps: a difference hash
(the image in grey shrunk to 9x8, one bit per pair of horizontal neighbours: brighter or not)
names candidates, pairs whose 64-bit hashes differ in at most ``CANDIDATE_BITS`` bits, found by
comparing every hash with every other in blocks (XOR and a popcount in NumPy); then a candidate
pair is a near copy where the images' 16x16 grey thumbnails, less their mean, have a cosine
similarity of at least ``NEAR_COSINE``. The hash alone calls thousands of different small
grey pictures (digits, clothes on black) copies of one another; the thumbnails tell them apart
(BENCHMARKS.md: the measurements the two thresholds rest on).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CANDIDATE_BITS = 12  # hashes this close make a candidate pair...
NEAR_COSINE = 0.99  # ...and thumbnails this alike make it a near copy
THUMBNAIL = 16  # the thumbnails' side in pixels
BLOCK = 2048  # hashes compared with BLOCK others at once


@dataclass
class Fingerprint:
    """What duplicate finding keeps of one image file."""

    path: str
    split: str  # train, val, test, or "all" outside a split folder
    sha256: str
    dhash: int
    thumbnail: np.ndarray  # float16 [THUMBNAIL * THUMBNAIL], zero mean, unit length (all zeros for a flat image)


def difference_hash(image: Image.Image) -> int:
    """The 64-bit difference hash of a decoded image."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR, reducing_gap=2.0), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def thumbnail(image: Image.Image) -> np.ndarray:
    """The image in grey at THUMBNAIL x THUMBNAIL, less its mean, scaled to unit length (float16)."""
    grey = np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR, reducing_gap=2.0), dtype=np.float32).flatten()
    grey -= grey.mean()
    norm = float(np.linalg.norm(grey))
    return (grey / norm if norm > 0 else grey).astype(np.float16)


def near_pairs(hashes: list[int], max_bits: int = CANDIDATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, differing bits) for every i < j whose hashes differ in at most ``max_bits`` bits
    (every pair kept: for tests and studies; ``find_duplicates`` confirms block by block instead)."""
    pairs: list[tuple[int, int, int]] = []
    for start, other, rows, columns, distances in candidate_blocks(np.asarray(hashes, dtype=np.uint64), max_bits):
        pairs += [(start + r, other + c, int(d)) for r, c, d in zip(rows.tolist(), columns.tolist(), distances.tolist())]
    return pairs


def candidate_blocks(values: np.ndarray, max_bits: int):
    """For each BLOCK x BLOCK tile of the upper triangle: (row offset, column offset, rows, columns,
    distances) of its pairs i < j whose hashes differ in at most ``max_bits`` bits."""
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        for other in range(start, len(values), BLOCK):
            distances = np.bitwise_count(block[:, None] ^ values[None, other : other + BLOCK])
            rows, columns = np.nonzero(distances <= max_bits)
            upper = start + rows < other + columns
            if upper.any():
                yield start, other, rows[upper], columns[upper], distances[rows[upper], columns[upper]]


@dataclass
class DuplicateGroup:
    """Files that are copies of one another: ``exact`` when all share their bytes."""

    files: list[str]
    splits: list[str]
    exact: bool
    cosine: float = 1.0  # the least thumbnail similarity that joined the group (1 for exact copies)

    @property
    def across_splits(self) -> bool:
        return len(set(self.splits)) > 1


@dataclass
class DuplicateReport:
    groups: list[DuplicateGroup] = field(default_factory=list)

    @property
    def across(self) -> list[DuplicateGroup]:
        return [g for g in self.groups if g.across_splits]

    @property
    def within(self) -> list[DuplicateGroup]:
        return [g for g in self.groups if not g.across_splits]

    def redundant(self) -> list[str]:
        """The files to drop for a deduplicated list: in each group all but one, keeping a train
        file where there is one (the copies that leak into val or test go)."""
        dropped = []
        for group in self.groups:
            order = sorted(range(len(group.files)), key=lambda i: (group.splits[i] != "train", group.files[i]))
            dropped += [group.files[i] for i in order[1:]]
        return sorted(dropped)

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": len(self.groups), "across_splits": len(self.across), "within_splits": len(self.within),
            "files_to_drop": len(self.redundant()),
            "duplicates": [{"files": g.files, "splits": g.splits, "exact": g.exact, "cosine": g.cosine} for g in self.groups],
        }  # fmt: skip


def find_duplicates(files: list[Fingerprint], candidate_bits: int = CANDIDATE_BITS, near_cosine: float = NEAR_COSINE) -> DuplicateReport:
    """Groups of copies among ``files``: files joined by equal bytes, or by near hashes and alike
    thumbnails (see the module), transitively. Pairs are confirmed and joined one tile of hashes
    at a time, so memory stays bounded however many images look alike (blank pages)."""
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        by_digest[f.sha256].append(i)
    for members in by_digest.values():
        for i in members[1:]:
            parent[root(i)] = root(members[0])
    digests = np.array([f.sha256 for f in files])
    thumbnails = np.stack([f.thumbnail for f in files]).astype(np.float32) if files else np.zeros((0, THUMBNAIL * THUMBNAIL), np.float32)
    least: dict[int, float] = {}  # the least cosine that joined a near pair, by one member
    for start, other, rows, columns, _ in candidate_blocks(np.asarray([f.dhash for f in files], dtype=np.uint64), candidate_bits):
        first, second = start + rows, other + columns
        for a in range(0, len(first), 1 << 16):  # at most 65,536 pairs' thumbnails at once (64 MB)
            i, j = first[a : a + (1 << 16)], second[a : a + (1 << 16)]
            cosines = np.einsum("ij,ij->i", thumbnails[i], thumbnails[j])
            keep = (cosines >= near_cosine) & (digests[i] != digests[j])
            for x, y, c in zip(i[keep].tolist(), j[keep].tolist(), cosines[keep].tolist()):
                parent[root(x)] = root(y)
                least[x] = min(least.get(x, 1.0), c)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(files)):
        clusters[root(i)].append(i)
    groups = []
    for members in clusters.values():
        if len(members) > 1:
            members.sort(key=lambda i: files[i].path)
            exact = len({files[i].sha256 for i in members}) == 1
            cosine = 1.0 if exact else round(min((least[i] for i in members if i in least), default=1.0), 4)
            groups.append(DuplicateGroup([files[i].path for i in members], [files[i].split for i in members], exact, cosine))
    return DuplicateReport(sorted(groups, key=lambda g: (not g.across_splits, g.files)))


def split_of(relative: Path) -> str:
    """The split a file belongs to below a dataset root (train, val, test), else "all"."""
    first = relative.parts[0] if len(relative.parts) > 1 else ""
    return first if first in ("train", "val", "test") else "all"


__all__ = ["CANDIDATE_BITS", "NEAR_COSINE", "DuplicateGroup", "DuplicateReport", "Fingerprint", "difference_hash", "find_duplicates", "near_pairs", "split_of", "thumbnail"]
