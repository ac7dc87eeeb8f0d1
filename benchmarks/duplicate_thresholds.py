"""What the near-copy thresholds of `imgrec verify --duplicates` rest on, measured on real data.

For each dataset (ImageFolder roots from benchmarks/real_datasets.py), every pair of different
images (different pixels) is a pair that must NOT be called a copy, and three copies of 200
images drawn at random (resized to 80%, re-encoded as JPEG quality 60, brightened by 12 levels)
are pairs that must be. For the difference hash alone, and for the hash as a candidate step
followed by the thumbnail check, it counts the different pairs called copies and the share of
copies found.

    python benchmarks/duplicate_thresholds.py /tmp/real_datasets/*    # a markdown table
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imgrec.data.duplicates import CANDIDATE_BITS, difference_hash, near_pairs, thumbnail
from imgrec.data.folder import iter_image_files

COSINES = (0.95, 0.98, 0.99)


def copies(image: Image.Image) -> list[Image.Image]:
    small = image.resize((max(1, int(image.width * 0.8)), max(1, int(image.height * 0.8))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    brighter = Image.fromarray(np.clip(np.asarray(image).astype(int) + 12, 0, 255).astype(np.uint8))
    return [small, Image.open(buffer).convert("RGB"), brighter]


def study(root: Path) -> dict:
    files = iter_image_files(root)
    images = [Image.open(f).convert("RGB") for f in files]
    hashes, thumbs = [difference_hash(im) for im in images], np.stack([thumbnail(im) for im in images]).astype(np.float32)
    pixels = [hashlib.sha256(im.tobytes()).hexdigest() for im in images]
    different = [(i, j, d) for i, j, d in near_pairs(hashes, 12) if pixels[i] != pixels[j]]
    cosines = np.array([float(thumbs[i] @ thumbs[j]) for i, j, d in different if d <= CANDIDATE_BITS])
    bits, similar = [], []
    for i in random.Random(0).sample(range(len(images)), min(200, len(images))):
        for copy in copies(images[i]):
            bits.append(bin(hashes[i] ^ difference_hash(copy)).count("1"))
            similar.append(float(thumbs[i] @ thumbnail(copy).astype(np.float32)))
    bits, similar = np.array(bits), np.array(similar)
    row = {"dataset": root.name, "images": len(files), "pairs": len(files) * (len(files) - 1) // 2}
    for b in (4, 8):
        row[f"hash<={b}: different"] = sum(1 for *_, d in different if d <= b)
        row[f"hash<={b}: copies found"] = float((bits <= b).mean())
    for c in COSINES:
        row[f"hash<={CANDIDATE_BITS}+cos>={c}: different"] = int((cosines >= c).sum())
        row[f"hash<={CANDIDATE_BITS}+cos>={c}: copies found"] = float(((bits <= CANDIDATE_BITS) & (similar >= c)).mean())
    return row


def main() -> int:
    roots = [Path(p) for p in sys.argv[1:]]
    if not roots:
        sys.exit("usage: python benchmarks/duplicate_thresholds.py DATASET_ROOT...")
    rows = [study(root) for root in roots]
    columns = [k for k in rows[0] if k not in ("dataset", "images", "pairs")]
    print("| dataset | images | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else f"{r[c]:,}" for c in columns]
        print(f"| {r['dataset']} | {r['images']:,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
