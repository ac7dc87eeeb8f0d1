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
    """(i, j, differing bits) for every i < j whose hashes differ in at most ``max_bits`` bits,
    compared BLOCK x BLOCK at a time (4 MB of distances each)."""
    values = np.asarray(hashes, dtype=np.uint64)
    pairs = []
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        for other in range(start, len(values), BLOCK):
            distances = np.bitwise_count(block[:, None] ^ values[None, other : other + BLOCK])
            rows, columns = np.nonzero(distances <= max_bits)
            pairs += [(start + r, other + c, int(distances[r, c])) for r, c in zip(rows.tolist(), columns.tolist()) if start + r < other + c]
    return pairs


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
    thumbnails (see the module), transitively."""
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
    near = confirmed(files, near_pairs([f.dhash for f in files], candidate_bits), near_cosine)
    for i, j, _ in near:
        parent[root(i)] = root(j)
    least: dict[int, float] = {}
    for i, _, cosine in near:
        least[root(i)] = min(least.get(root(i), 1.0), cosine)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(files)):
        clusters[root(i)].append(i)
    groups = []
    for top, members in clusters.items():
        if len(members) > 1:
            members.sort(key=lambda i: files[i].path)
            exact = len({files[i].sha256 for i in members}) == 1
            groups.append(DuplicateGroup([files[i].path for i in members], [files[i].split for i in members], exact, 1.0 if exact else round(least.get(top, 1.0), 4)))
    return DuplicateReport(sorted(groups, key=lambda g: (not g.across_splits, g.files)))


def confirmed(files: list[Fingerprint], candidates: list[tuple[int, int, int]], near_cosine: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) of the candidate pairs whose thumbnails are at least ``near_cosine`` alike (exact copies left out)."""
    pairs = [(i, j) for i, j, _ in candidates if files[i].sha256 != files[j].sha256]
    if not pairs:
        return []
    thumbnails = np.stack([f.thumbnail for f in files]).astype(np.float32)
    first, second = (np.asarray(side) for side in zip(*pairs))
    cosines = np.einsum("ij,ij->i", thumbnails[first], thumbnails[second])
    return [(int(i), int(j), float(c)) for i, j, c in zip(first, second, cosines) if c >= near_cosine]


def split_of(relative: Path) -> str:
    """The split a file belongs to below a dataset root (train, val, test), else "all"."""
    first = relative.parts[0] if len(relative.parts) > 1 else ""
    return first if first in ("train", "val", "test") else "all"


__all__ = ["CANDIDATE_BITS", "NEAR_COSINE", "DuplicateGroup", "DuplicateReport", "Fingerprint", "difference_hash", "find_duplicates", "near_pairs", "split_of", "thumbnail"]
