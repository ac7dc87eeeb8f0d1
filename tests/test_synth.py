import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.data.synth import SHAPES, SynthSpec, render_sample, write_synth_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_layout_counts_and_decode(tmp_path):
    spec = SynthSpec(classes=10, train_per_class=3, val_per_class=2, seed=1)
    out = write_synth_dataset(tmp_path / "ds", spec, workers=1)
    assert out == tmp_path / "ds"
    for split, count in (("train", 3), ("val", 2)):
        folders = sorted(p.name for p in (out / split).iterdir() if p.is_dir())
        assert folders == sorted(SHAPES[:10])
        for shape in SHAPES[:10]:
            jpgs = sorted((out / split / shape).glob("*.jpg"))
            assert [p.name for p in jpgs] == [f"{shape}_{i:05d}.jpg" for i in range(count)]
            for p in jpgs:
                with Image.open(p) as img:
                    assert img.format == "JPEG"
                    img.load()
                    assert img.mode == "RGB"
                    w, h = img.size
                assert 96 <= w <= 320 and 96 <= h <= 320
                assert max(w, h) <= 2.5 * min(w, h) + 1
    assert (out / "imgrec-synth.json").is_file()


def test_same_seed_same_bytes_any_workers(tmp_path):
    small = SynthSpec(classes=3, train_per_class=2, val_per_class=1, seed=5)
    a = _files(write_synth_dataset(tmp_path / "a", small, workers=1))
    b = _files(write_synth_dataset(tmp_path / "b", small, workers=1))
    assert len(a) == 9 and a == b

    # > 64 jobs with workers=2 takes the process-pool path
    big = SynthSpec(classes=2, train_per_class=30, val_per_class=10, seed=5, min_side=32, max_side=48)
    serial = _files(write_synth_dataset(tmp_path / "s", big, workers=1))
    parallel = _files(write_synth_dataset(tmp_path / "p", big, workers=2))
    assert len(serial) == 80
    assert serial == parallel

    other = _files(write_synth_dataset(tmp_path / "c", SynthSpec(classes=3, train_per_class=2, val_per_class=1, seed=6), workers=1))
    assert set(other) == set(a)
    assert all(other[k] != a[k] for k in a)


def test_render_sample_deterministic():
    x = np.asarray(render_sample(np.random.default_rng(3), "star"))
    y = np.asarray(render_sample(np.random.default_rng(3), "star"))
    assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
    assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="unknown shape"):
        render_sample(np.random.default_rng(0), "blob")


@pytest.mark.parametrize(
    "kwargs",
    [{"classes": 1}, {"classes": 13}, {"train_per_class": 0}, {"val_per_class": 0}, {"min_side": 8}, {"min_side": 200, "max_side": 100}],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        SynthSpec(**kwargs)


def test_spec_bounds_ok():
    assert SynthSpec(classes=2).classes == 2
    assert SynthSpec(classes=len(SHAPES)).classes == 12


def _load(root: Path, split: str, size: int = 32):
    xs, ys = [], []
    for label, shape in enumerate(SHAPES[:10]):
        for p in sorted((root / split / shape).glob("*.jpg")):
            with Image.open(p) as img:
                xs.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32).reshape(-1))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


@pytest.mark.slow
def test_linear_classifier_near_chance(tmp_path):
    start = time.perf_counter()
    spec = SynthSpec(classes=10, train_per_class=60, val_per_class=20, seed=0)
    root = write_synth_dataset(tmp_path / "ds", spec, workers=2)
    xtr, ytr = _load(root, "train")
    xva, yva = _load(root, "val")
    assert xtr.shape == (600, 32 * 32 * 3) and xva.shape == (200, 32 * 32 * 3)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd

    torch.manual_seed(0)
    linear = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), ytr)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = (linear(xtr).argmax(1) == ytr).float().mean().item()
        val_acc = (linear(xva).argmax(1) == yva).float().mean().item()
    print(f"linear probe: train top-1 {train_acc:.3f}, val top-1 {val_acc:.3f} (chance 0.10), {time.perf_counter() - start:.1f}s")
    assert train_acc > 0.5  # the classifier did fit the training set
    assert val_acc < 0.5
