"""Training from every kind of data source through the CLI: shards, ImageNet's raw archives, both loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from archives import LEAVES, build_archives
from imgrec.cli import main as cli_main
from imgrec.data.synth import SynthSpec, write_synth_dataset
from runs import quiet

TRAIN_FLAGS = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--crop-pct", "1.0",
               "--device", "cpu", "--precision", "fp32", "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    spec = SynthSpec(classes=3, train_per_class=8, val_per_class=4, seed=0, min_side=48, max_side=96)
    return write_synth_dataset(tmp_path_factory.mktemp("data") / "data", spec, workers=1)


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    assert cli_main(["shards", str(folder / "train"), str(root / "train"), "--max-side", "64", "--shard-size", "40KB", "--workers", "1"]) == 0
    classes = str(root / "train" / "classes.json")
    assert cli_main(["shards", str(folder / "val"), str(root / "val"), "--max-side", "64", "--classes", classes, "--workers", "1"]) == 0
    return root


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_train_on_a_root_of_shard_folders(shards: Path, tmp_path: Path, workers: str) -> None:
    run = tmp_path / "run"
    assert len(list((shards / "train").glob("shard-*.tar"))) > 2
    assert cli_main(["train", "--data", str(shards), "--out", str(run), "--workers", workers, *TRAIN_FLAGS]) == 0
    [row] = metrics(run)
    assert row["epoch"] == 1 and 0 <= row["val_top1"] <= 100
    info = json.loads((run / "model.json").read_text())
    assert info["classes"] == ["circle", "square", "triangle"]


def test_train_on_a_shard_pattern_with_val_shards(shards: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in (shards / "train").glob("shard-*.tar"))
    pattern = str(shards / "train" / f"shard-{{000000..{len(names) - 1:06d}}}.tar")
    run = tmp_path / "run"
    assert cli_main(["train", "--data", pattern, "--val-data", f"pipe:cat {shards / 'val' / 'shard-000000.tar'}",
                     "--out", str(run), "--workers", "0", *TRAIN_FLAGS]) == 0  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"] == pattern and config["val_data"].startswith("pipe:cat")
    assert len(metrics(run)) == 1


def test_a_shard_pattern_without_val_data_is_a_clear_error(shards: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["train", "--data", str(shards / "train"), "--out", str(tmp_path / "r"), *TRAIN_FLAGS]) == 2
    assert "--val-data" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["fast", "standard", None])
def test_both_loaders_train_and_the_choice_is_recorded(folder: Path, tmp_path: Path, loader: str | None) -> None:
    run = tmp_path / "run"
    flags = ["--loader", loader] if loader else []
    assert cli_main(["train", "--data", str(folder), "--out", str(run), "--workers", "0", *flags, *TRAIN_FLAGS]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["loader"] == (loader or "fast")


def test_imagenet_archives_to_a_model_that_names_its_classes(tmp_path: Path, capsys) -> None:
    build_archives(tmp_path / "src")
    data, run = tmp_path / "imagenet", tmp_path / "run"
    assert cli_main(["prepare", "imagenet", "--src", str(tmp_path / "src"), "--out", str(data)]) == 0
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--workers", "0", *TRAIN_FLAGS]) == 0
    info = json.loads((run / "model.json").read_text())
    words = {wnid: text for _, wnid, text, _ in LEAVES}
    assert info["class_names"] == {wnid: words[wnid] for wnid in sorted(words)}
    capsys.readouterr()
    image = next((data / "val").rglob("*.JPEG"))
    assert cli_main(["predict", str(run), str(image), "--format", "json", "--topk", "2"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in row["top"]] == [words[t["class"]] for t in row["top"]]


PRETRAIN_FLAGS = ["--model", "test_resnet", "--method", "simclr", "--epochs", "1", "--batch-size", "4", "--img-size", "32",
                  "--device", "cpu", "--precision", "fp32", "--proj-hidden-dim", "32", "--warmup-epochs", "0", "--no-tensorboard"]  # fmt: skip


@pytest.mark.parametrize("workers", ["0", "2"])
def test_pretrain_on_a_root_of_shard_folders(shards: Path, tmp_path: Path, workers: str) -> None:
    run = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(shards), "--out", str(run), "--workers", workers, *PRETRAIN_FLAGS]) == 0
    rows = metrics(run)
    assert len(rows) == 1 and rows[0]["loss"] > 0
    assert 0 <= rows[0]["knn_top1"] <= 100  # the val shards are labelled: the monitor ran
    assert (run / "backbone.safetensors").is_file()


def test_pretrain_on_a_shard_source_alone(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"  # a folder of shards (not a root with train/ and val/): no labelled val, no monitor
    assert cli_main(["pretrain", "--data", str(shards / "train"), "--out", str(run), "--workers", "0", *PRETRAIN_FLAGS]) == 0
    rows = metrics(run)
    assert len(rows) == 1 and "knn_top1" not in rows[0]


# --- shards whose epochs end early ----------------------------------------------------------------


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
    from imgrec.engine.tasks.classify import train

    shards = json.loads((small_shards / "train" / "shards.json").read_text())
    assert len(shards["shards"]) >= 4 and shards["samples"] >= 16
    options = {"model": "test_resnet", "epochs": 1, "device": "cpu", "precision": "fp32", "tensorboard": False,
               "console": quiet(), "data_config": {"img_size": 16, "crop_pct": 1.0}}  # fmt: skip
    with pytest.raises(ValueError, match="--workers"):
        train(data=str(small_shards), out=str(tmp_path / "run"), batch_size=16, workers=2, **options)


def test_every_shard_epoch_runs_the_steps_its_schedule_counts_on(small_shards: Path, tmp_path: Path) -> None:
    from imgrec.data.shards import ShardDataset
    from imgrec.engine.tasks.classify import train

    run = train(data=str(small_shards), out=str(tmp_path / "run"), model="test_resnet", epochs=3, batch_size=4, workers=2,
                device="cpu", precision="fp32", tensorboard=False, console=quiet(),
                data_config={"img_size": 16, "crop_pct": 1.0})  # fmt: skip
    dataset = ShardDataset(small_shards / "train", shuffle=2000)
    expected = dataset.full_batches(4, 2, range(1, 4))
    sizes = [dataset.split_sizes(epoch, 2) for epoch in (1, 2, 3)]
    assert all(sum(s) == 24 for s in sizes) and expected == min(sum(n // 4 for n in s) for s in sizes) > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["train_loss"] > 0 for row in rows)
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule ran to its end: no step was missing
