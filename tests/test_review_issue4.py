"""Bugs a review of the fast loader / shards / prepare change found, each pinned by a test."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from imgrec.data.decode import BadImageError, EncodedImage, load_rgb, load_sample
from imgrec.data.decode_crop import CenterCropDecode
from imgrec.data.transforms import EvalTransform


def _smooth(width: int, height: int) -> Image.Image:
    """A smooth, photo-like image (no pixel noise: the comparison is about geometry)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 90 * np.sin(x / 9.0) * np.cos(y / 13.0)
    g = 128 + 90 * np.sin((x + y) / 11.0)
    b = 128 + 90 * np.cos(x / 7.0 - y / 17.0)
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def _mae(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().mean().item()


# --- decode_crop: EXIF orientation x DCT scale ---------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_rotated_jpeg_with_a_partial_dct_pixel_crops_where_the_reference_does(orientation: int) -> None:
    # 521 x 393: both sides are 1 more than a multiple of 8, so at DCT scale 1/8 the last decoded
    # row/column covers 1 original pixel instead of 8. Orientation 1 gives MAE ~0.3 here.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_smooth(521, 393), exif=exif.tobytes())
    source = EncodedImage("rotated.jpg", data)
    ours = CenterCropDecode(48, crop_pct=0.875, interpolation="bicubic")(source)
    reference = EvalTransform(img_size=48, crop_pct=0.875, interpolation="bicubic")(load_rgb(source))
    assert _mae(ours, reference) < 3.0


def test_control_orientation_1_matches() -> None:
    """Control for the test above: same image, no rotation, the fast path matches the reference."""
    source = EncodedImage("upright.jpg", _jpeg(_smooth(521, 393)))
    ours = CenterCropDecode(48, crop_pct=0.875, interpolation="bicubic")(source)
    reference = EvalTransform(img_size=48, crop_pct=0.875, interpolation="bicubic")(load_rgb(source))
    assert _mae(ours, reference) < 3.0


# --- decode_crop: nearest -------------------------------------------------------------------------


def test_nearest_samples_the_same_pixels_as_the_standard_pipeline() -> None:
    ramp = np.tile((np.arange(48) * 5).astype(np.uint8)[None, :, None], (48, 1, 3))
    image = Image.fromarray(ramp)
    ours = CenterCropDecode(16, crop_pct=1.0, interpolation="nearest")(image)
    reference = EvalTransform(img_size=16, crop_pct=1.0, interpolation="nearest")(image)
    assert torch.equal(ours, reference)  # ours: 0, 15, 30...; reference: 5, 20, 35...


# --- decode: an OS error on one file ------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
def test_an_os_error_reading_one_file_is_a_bad_image(tmp_path: Path, fast: bool) -> None:
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)  # reading it raises OSError(ELOOP), a stand-in for EIO
    transform = CenterCropDecode(16) if fast else EvalTransform(img_size=16)
    with pytest.raises(BadImageError):
        load_sample(loop, transform)


# --- shards: a damaged shard --------------------------------------------------------------------


def _write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpg, label in samples:
            for ext, data in (("jpg", jpg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_truncated_shard_is_logged_and_skipped_not_fatal(tmp_path: Path) -> None:
    from imgrec.data.shards import ShardDataset

    jpg = _jpeg(_smooth(24, 20))
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "shard-000000.tar", [(f"{i:04d}", jpg, i % 2) for i in range(3)])
    _write_tar(folder / "shard-000001.tar", [(f"{i:04d}", jpg, i % 2) for i in range(3, 6)])
    damaged = folder / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside the first member's data
    dataset = ShardDataset(folder, CenterCropDecode(8), classes=["a", "b"], length=6)
    items = list(dataset)  # raises tarfile.ReadError today
    assert len(items) >= 3 and len(dataset.skip_log) >= 1


# --- training on shards: epochs that end early -------------------------------------------------


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    from imgrec.data.shard_writer import write_shards
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    tmp = tmp_path_factory.mktemp("review_shards")
    spec = SynthSpec(classes=3, train_per_class=8, val_per_class=2, seed=0, min_side=40, max_side=64)
    data = write_synth_dataset(tmp / "data", spec, workers=1)
    root = tmp / "shards"
    write_shards(data / "train", root / "train", max_side=48, shard_size=20_000, workers=1)  # 12 shards of 2
    write_shards(data / "val", root / "val", max_side=48, workers=1, classes=root / "train" / "classes.json")
    return root


def test_training_on_shards_with_more_workers_than_full_batches_is_a_clear_error(small_shards: Path, tmp_path: Path) -> None:
    # Each loader worker drops its own last partial batch: 24 samples over 2 workers at batch 16
    # give no full batch at all. That must be an error before training, not an epoch of nothing.
    from imgrec.engine.train import train

    shards = json.loads((small_shards / "train" / "shards.json").read_text())
    assert len(shards["shards"]) >= 4 and shards["samples"] >= 16
    options = {"model": "test_resnet", "epochs": 1, "device": "cpu", "precision": "fp32", "tensorboard": False,
               "console": Console(file=io.StringIO()), "data_config": {"img_size": 16, "crop_pct": 1.0}}  # fmt: skip
    with pytest.raises(ValueError, match="--workers"):
        train(data=str(small_shards), out=str(tmp_path / "run"), batch_size=16, workers=2, **options)


def test_every_shard_epoch_runs_the_steps_its_schedule_counts_on(small_shards: Path, tmp_path: Path) -> None:
    from imgrec.data.shards import ShardDataset
    from imgrec.engine.train import train

    run = train(data=str(small_shards), out=str(tmp_path / "run"), model="test_resnet", epochs=3, batch_size=4, workers=2,
                device="cpu", precision="fp32", tensorboard=False, console=Console(file=io.StringIO()),
                data_config={"img_size": 16, "crop_pct": 1.0})  # fmt: skip
    dataset = ShardDataset(small_shards / "train", shuffle=2000)
    expected = dataset.full_batches(4, 2, range(1, 4))
    sizes = [dataset.split_sizes(epoch, 2) for epoch in (1, 2, 3)]
    assert all(sum(s) == 24 for s in sizes) and expected == min(sum(n // 4 for n in s) for s in sizes) > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["train_loss"] > 0 for row in rows)
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule ran to its end: no step was missing


def test_an_epoch_that_ends_mid_accumulation_leaves_no_stale_gradients() -> None:
    from imgrec.engine.resume import init_loop_state
    from imgrec.engine.train import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(3)]  # 3 of the 4 planned micro-batches
    run = SimpleNamespace(
        config=SimpleNamespace(accum_steps=2, epochs=1, freeze_backbone=False, clip_grad=None, checkpoint_every=None, checkpoint_minutes=0, max_bad_steps=10),
        model=model, forward=model, device=torch.device("cpu"), precision="fp32", steps_per_epoch=2,
        console=Console(file=io.StringIO()), train_loader=batches, train_normalize=lambda x: x, mixup=None,
        criterion=torch.nn.CrossEntropyLoss(), scaler=torch.amp.GradScaler("cpu", enabled=False), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), ema=None,
    )  # fmt: skip
    init_loop_state(run)
    train_one_epoch(run, 1)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
