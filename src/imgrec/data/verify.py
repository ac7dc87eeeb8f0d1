"""Check every image below a folder in parallel: which files are bad and why, and a summary.

Each file goes through the robust decoder of the standard pipeline (``load_rgb``), which the
fast decode-and-crop pipeline also falls back to for every file libjpeg-turbo will not take, so a
file that passes here will load in training, and one that fails here would be skipped there.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from imgrec.data.decode import DEFAULT_MAX_PIXELS, BadImageError, decode_file
from imgrec.data.duplicates import DuplicateReport, Fingerprint, difference_hash, find_duplicates, split_of, thumbnail
from imgrec.data.folder import iter_image_files
from imgrec.progress import track
from imgrec.utils import available_cpus, file_sha256

SPLIT_NAMES = ("train", "val", "test")
# The formats an extension promises; a file whose content differs (a PNG named .JPEG) is noted.
EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF",
}  # fmt: skip


@dataclass
class FileCheck:
    path: str
    group: str  # class folder (split/class for a train/val root)
    ok: bool
    reason: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""  # colour mode as stored
    fingerprint: Fingerprint | None = None  # with duplicates=True: what finding copies needs


@dataclass
class VerifyReport:
    root: str
    files: list[FileCheck] = field(default_factory=list)
    duplicates: DuplicateReport | None = None  # with duplicates=True

    @property
    def bad(self) -> list[FileCheck]:
        return [f for f in self.files if not f.ok]

    @property
    def good(self) -> list[FileCheck]:
        return [f for f in self.files if f.ok]

    @property
    def misnamed(self) -> list[FileCheck]:
        """Readable files whose extension names another format (harmless, but worth knowing)."""
        return [f for f in self.good if EXTENSION_FORMATS.get(Path(f.path).suffix.lower(), f.format) != f.format]

    def per_group(self) -> dict[str, tuple[int, int]]:
        """{group: (files, bad files)}, groups sorted by name."""
        total, bad = Counter(f.group for f in self.files), Counter(f.group for f in self.bad)
        return {g: (total[g], bad[g]) for g in sorted(total)}

    def per_format(self) -> dict[str, int]:
        return dict(sorted(Counter(f.format for f in self.good).items()))

    def size_range(self) -> dict[str, list[int]] | None:
        good = self.good
        if not good:
            return None
        widths, heights = [f.width for f in good], [f.height for f in good]
        return {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)]}

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "files": len(self.files),
            "bad": len(self.bad),
            "bad_files": [{"path": f.path, "reason": f.reason} for f in self.bad],
            "misnamed": [{"path": f.path, "format": f.format} for f in self.misnamed],
            "per_class": {g: {"files": n, "bad": b} for g, (n, b) in self.per_group().items()},
            "per_format": self.per_format(),
            "size_range": self.size_range(),
            **({"duplicates": self.duplicates.to_json()} if self.duplicates is not None else {}),
        }


def verify_folder(
    root: str | os.PathLike, *, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, duplicates: bool = False, console: Console | None = None
) -> VerifyReport:
    """Decode every image file below ``root`` (any layout) with ``workers`` processes; a bar on
    ``console`` where it is a terminal. ``duplicates`` also finds exact and near copies inside
    and across the splits (``imgrec.data.duplicates``) from what the same decode gives."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the dataset root or a class folder to verify")
    paths = iter_image_files(root)
    jobs = [(str(p), group_of(p.relative_to(root)), max_pixels, split_of(p.relative_to(root)) if duplicates else None) for p in paths]
    workers = workers or available_cpus()
    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(workers) as pool:
            checked = pool.map(check_file, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
            checks = list(track(checked, f"verifying {root}", console=console, total=len(jobs)))
    else:
        checks = [check_file(job) for job in track(jobs, f"verifying {root}", console=console)]
    report = VerifyReport(root=str(root), files=checks)
    if duplicates:
        report.duplicates = find_duplicates([f.fingerprint for f in checks if f.fingerprint is not None])
    return report


def group_of(relative: Path) -> str:
    """The class a file counts under: ``split/class`` below a train/val root, else its top folder."""
    parts = relative.parts
    if len(parts) > 2 and parts[0] in SPLIT_NAMES:
        return f"{parts[0]}/{parts[1]}"
    return parts[0] if len(parts) > 1 else "."


def check_file(job: tuple[str, str, int, str | None]) -> FileCheck:
    """One file decoded; with a split named, its fingerprint for duplicate finding as well."""
    path, group, max_pixels, split = job
    try:
        image, fmt, mode = decode_file(path, max_pixels)
    except BadImageError as exc:
        return FileCheck(path, group, ok=False, reason=exc.reason)
    fingerprint = Fingerprint(path, split, file_sha256(path), difference_hash(image), thumbnail(image)) if split is not None else None
    return FileCheck(path, group, ok=True, format=fmt, width=image.width, height=image.height, mode=mode, fingerprint=fingerprint)


__all__ = ["FileCheck", "VerifyReport", "check_file", "group_of", "verify_folder"]
