"""The recipe: what imgrec picks from the data when the user leaves a setting open, and the
learning-rate range test behind ``--lr auto`` and ``imgrec lr-find``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from imgrec.config import PretrainConfig, TrainConfig
from imgrec.data.stats import DataStats, dataset_stats
from imgrec.engine.lr_find import suggest_lr
from imgrec.models.factory import create_model
from imgrec.recipe import RULES, resolve_recipe
from runs import quiet, read_metrics

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    with torch.device("meta"):
        return create_model("resnet18", num_classes=10)


def stats(images: int, side: int | None, classes: int = 10) -> DataStats:
    return DataStats(images, classes, images // classes, images // classes, side, side, 0.0)


def chosen(config, data, model, **options) -> dict:
    resolved, choices = resolve_recipe(config, data, model=model, device=CPU, **options)
    return {c.name: c.value for c in choices} | {"config": resolved, "reasons": {c.name: c.reason for c in choices}}


def test_the_scans_of_the_issue_get_the_recipe_that_trains_them(resnet18) -> None:
    got = chosen(TrainConfig(data="x", model="resnet18", epochs=8), stats(1438, 8), resnet18)
    assert got["batch_size"] == 64 and "22 steps per epoch" in got["reasons"]["batch_size"]
    assert got["base_lr"] == RULES["scratch_lr"]["adamw"] and "0.002 at this batch" in got["reasons"]["base_lr"]
    assert got["img_size"] == 32 and got["scale"] == (1.0, 1.0) and got["crop_pct"] == 1.0  # 8 epochs: whole images
    assert got["warmup_epochs"] == pytest.approx(0.4)
    config = got["config"]
    assert config.batch_size == 64 and config.base_lr == RULES["scratch_lr"]["adamw"] and config.lr is None
    assert config.data_config == {"img_size": 32, "scale": (1.0, 1.0), "crop_pct": 1.0}


@pytest.mark.parametrize("epochs, smallest", [(2, 1.0), (8, 1.0), (19, 0.8), (30, 0.6), (300, 0.6)])
def test_small_images_are_cropped_harder_the_longer_the_run(resnet18, epochs: int, smallest: float) -> None:
    got = chosen(TrainConfig(data="x", epochs=epochs), stats(1438, 28), resnet18)
    assert got["scale"] == (smallest, 1.0) and f"{epochs} epochs" in got["reasons"]["scale"]
    assert "scale" not in chosen(TrainConfig(data="x", epochs=epochs), stats(1438, 96), resnet18)  # larger images keep RandomResizedCrop's own range


@pytest.mark.parametrize("images, batch", [(100, 16), (639, 16), (640, 32), (1438, 64), (2560, 128), (1_281_167, 128)])
def test_the_batch_leaves_enough_steps_per_epoch(resnet18, images: int, batch: int) -> None:
    assert chosen(TrainConfig(data="x"), stats(images, 300), resnet18)["batch_size"] == batch


def test_a_gpu_takes_larger_batches(resnet18) -> None:
    resolved, _ = resolve_recipe(TrainConfig(data="x"), stats(100_000, 300), model=resnet18, device=torch.device("cuda"))
    assert resolved.batch_size == RULES["batch_gpu"][1]


def test_imagenet_sized_data_keeps_imagenet_practice(resnet18) -> None:
    got = chosen(TrainConfig(data="x", epochs=90), stats(1_281_167, 400, classes=1000), resnet18)
    assert got["base_lr"] == RULES["imagenet_lr"]["adamw"] and "ImageNet" in got["reasons"]["base_lr"]
    assert "img_size" not in got and "scale" not in got and "crop_pct" not in got  # large photos: the architecture's 224, RRC 0.08
    assert got["warmup_epochs"] == RULES["warmup_max"]


def test_fine_tuning_takes_a_lower_rate_and_a_shorter_warmup(resnet18) -> None:
    scratch = chosen(TrainConfig(data="x", epochs=20), stats(5000, 300), resnet18)
    tuned = chosen(TrainConfig(data="x", epochs=20), stats(5000, 300), resnet18, finetune="weights")
    assert tuned["base_lr"] == pytest.approx(scratch["base_lr"] * RULES["finetune_lr"]["weights"]) and "fine-tuning" in tuned["reasons"]["base_lr"]
    from_run = chosen(TrainConfig(data="x", epochs=20), stats(5000, 300), resnet18, finetune="run")
    assert from_run["base_lr"] == pytest.approx(scratch["base_lr"]) and "imgrec run" in from_run["reasons"]["base_lr"]
    assert tuned["warmup_epochs"] < scratch["warmup_epochs"]


def test_every_setting_given_is_kept_and_nothing_is_chosen(resnet18) -> None:
    given = TrainConfig(data="x", batch_size=48, lr=3e-3, warmup_epochs=2.0, data_config={"img_size": 40, "scale": (0.5, 1.0), "crop_pct": 0.9})
    resolved, choices = resolve_recipe(given, stats(1438, 8), model=resnet18, device=CPU)
    assert choices == [] and resolved == given


def test_the_weights_card_wins_over_the_data_for_the_image_size(resnet18) -> None:
    from imgrec.card import ModelCard
    from imgrec.config import DataConfig

    card = ModelCard("resnet18", DataConfig(img_size=64, crop_pct=0.95))
    got = chosen(TrainConfig(data="x"), stats(1438, 8), resnet18, card=card, finetune="weights")
    assert "img_size" not in got and "crop_pct" not in got  # the card states both
    assert got["scale"] == (0.6, 1.0)  # the card says nothing of augmentation: 30 epochs on 8 px images


def test_pretraining_small_batches_use_adamw_and_the_data_sized_batch(resnet18) -> None:
    from imgrec.engine.tasks import method_class

    got = chosen(PretrainConfig(data="x", epochs=40), stats(360, 32), resnet18, method=method_class("simclr"))
    assert got["batch_size"] == 16 and got["opt"] == "adamw"
    assert got["base_lr"] == RULES["pretrain_adamw"]["base_lr"] and got["weight_decay"] == RULES["pretrain_adamw"]["weight_decay"]
    assert got["warmup_epochs"] == 4.0
    assert got["scale"] == (0.25, 1.0)  # 32 px images: a crop keeps at least 16 px of the side, not SimCLR's 8%
    assert got["crop_pct"] == 1.0  # evaluated whole, as a classifier of such images is: the backbone's card passes it to probes and fine-tuning
    assert got["img_size"] == RULES["pretrain_min_size"] == 64  # pretraining feeds small images at 64 px, not the classifier's 32
    assert "to pretrain on" in got["reasons"]["img_size"]
    assert chosen(TrainConfig(data="x", epochs=40), stats(360, 32), resnet18)["img_size"] == 32  # a classifier of them: 32 px
    assert "img_size" not in chosen(PretrainConfig(data="x", epochs=40, data_config={"img_size": 40}), stats(360, 32), resnet18, method=method_class("simclr"))
    assert chosen(PretrainConfig(data="x", epochs=40), stats(360, 96), resnet18, method=method_class("simclr"))["img_size"] == 96  # larger images: their own size
    lars = chosen(PretrainConfig(data="x", batch_size=1024, epochs=100), stats(1_281_167, 400), resnet18)
    assert "opt" not in lars and "base_lr" not in lars and lars["warmup_epochs"] == 10.0  # the paper's LARS, 10 warmup epochs


def test_dataset_stats_read_counts_and_header_sizes(tmp_path: Path) -> None:
    from PIL import Image

    from imgrec.data.folder import ImageFolderDataset

    for name, size, count in (("a", (30, 20), 3), ("b", (40, 20), 5)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("L" if name == "a" else "RGB", size).save(tmp_path / name / f"{i}.png")
    found = dataset_stats(ImageFolderDataset(tmp_path))
    assert (found.images, found.classes, found.smallest_class, found.largest_class) == (8, 2, 3, 5)
    assert (found.short_side, found.long_side) == (20, 40) and found.grey == pytest.approx(3 / 8)


def write_classes(root: Path, draw) -> list[tuple[str, int]]:
    """Two classes of 20 noisy 24 px images each, ``draw(label, x)`` the ink at column x."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        for i in range(20):
            columns = np.array([draw(label, x) for x in range(24)], dtype=np.float64)
            pixels = np.clip(np.tile(columns, (24, 1)) + rng.normal(0, 30, (24, 24)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
            samples.append((str(root / str(label) / f"{i}.png"), label))
    return samples


def test_the_mirror_test_tells_writing_from_photographs(tmp_path: Path, resnet18) -> None:
    from imgrec.data.stats import mirror_asymmetry

    # Class 0 is dark on the left and class 1 on the right: a mirrored 0 looks like a 1, as a mirrored "2" looks like no digit.
    sided = mirror_asymmetry(write_classes(tmp_path / "sided", lambda label, x: 220 if (x < 12) == (label == 0) else 30))
    # The classes differ in a stripe's width around the centre: a mirror changes nothing.
    centred = mirror_asymmetry(write_classes(tmp_path / "centred", lambda label, x: 220 if abs(x - 11.5) < 3 + 6 * label else 30))
    assert sided is not None and sided > 3 * RULES["mirror"] and centred is not None and centred < 0.1
    assert chosen(TrainConfig(data="x"), DataStats(40, 2, 20, 20, 24, 24, 1.0, sided), resnet18)["hflip"] == 0.0
    assert "hflip" not in chosen(TrainConfig(data="x"), DataStats(40, 2, 20, 20, 24, 24, 1.0, centred), resnet18)
    assert "hflip" not in chosen(TrainConfig(data="x", data_config={"hflip": 0.5}), DataStats(40, 2, 20, 20, 24, 24, 1.0, sided), resnet18)


# --- the learning-rate range test ----------------------------------------------------------------


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_loss() -> None:
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]  # 1e-6 .. 1
    losses = [2.3 - 1.5 * math.exp(-((math.log10(lr) + 1.5) ** 2)) + (3.0 if lr > 0.3 else 0.0) for lr in lrs]  # lowest at ~3e-2
    assert suggest_lr(lrs, losses) == pytest.approx(10**-1.5 / 10, rel=0.1)
    with pytest.raises(ValueError, match="too few"):
        suggest_lr(lrs[:2], losses[:2])


def test_lr_auto_runs_the_range_test_and_leaves_the_run_as_it_was(tiny_shapes: Path, tmp_path: Path) -> None:
    from imgrec.engine.tasks.classify import train

    common = dict(data=str(tiny_shapes), model="test_resnet", epochs=2, batch_size=4, device="cpu", precision="fp32", workers=0, tensorboard=False, data_config={"img_size": 32})
    console = quiet()
    auto = train(out=str(tmp_path / "auto"), lr="auto", console=console, **common)
    line = next(line for line in console.file.getvalue().splitlines() if line.startswith("lr auto:"))
    picked = float(line.split()[2])
    assert (auto / "lr_find.png").is_file() and json.loads((auto / "model.json").read_text())["epoch"] in (1, 2)
    import yaml

    assert yaml.safe_load((auto / "config.yaml").read_text())["lr"] == pytest.approx(picked, rel=1e-2)
    # The same run with that rate given: the range test left weights, optimizer and RNGs as they were.
    fixed = train(out=str(tmp_path / "fixed"), lr=yaml.safe_load((auto / "config.yaml").read_text())["lr"], console=quiet(), **common)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(auto)) == strip(read_metrics(fixed))


def test_lr_find_command_writes_the_curve_and_prints_the_suggestion(tiny_shapes: Path, tmp_path: Path, capsys) -> None:
    from imgrec.cli import main

    out = tmp_path / "lr"
    flags = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--device", "cpu"]
    assert main(["lr-find", "--data", str(tiny_shapes), "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert "suggested learning rate" in printed and (out / "lr_find.png").is_file()
    curve = json.loads((out / "lr_find.json").read_text())
    assert len(curve["lrs"]) == len(curve["losses"]) >= 3 and curve["suggestion"] in [lr / 10 for lr in curve["lrs"]]
