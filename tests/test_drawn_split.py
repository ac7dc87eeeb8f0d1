"""A root of class folders without val/: a stratified validation split drawn by the seed, recorded
in the run, and reused by resume and evaluate; a changed folder is reported, not re-split."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imgrec.data.folder import DatasetError
from imgrec.data.splits import SplitRecord, load_splits, stratified_split


def samples(counts: dict[int, int]) -> list[tuple[str, int]]:
    return [(f"c{label}/{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


def test_the_split_is_stratified_seeded_and_covers_every_image_once():
    data = samples({0: 10, 1: 20, 2: 5, 3: 1})
    train, val = stratified_split(data, 0.2, seed=4)
    per_class = {label: sum(1 for _, c in val if c == label) for label in range(4)}
    assert per_class == {0: 2, 1: 4, 2: 1, 3: 0}  # rounded, at least one where a class has two images or more
    assert sorted(train + val) == sorted(data) and not set(train) & set(val)
    assert stratified_split(data, 0.2, seed=4) == (train, val)
    assert stratified_split(data, 0.2, seed=5)[1] != val
    assert stratified_split(samples({0: 2}), 0.9, seed=0)[0]  # never every image of a class


def flat_root(folder: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (folder / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 10), (i * 20 % 255, 40, 90)).save(folder / name / f"{i:02d}.png")
    return folder


def test_a_recorded_split_is_reused_and_a_changed_folder_is_reported(tmp_path):
    root = flat_root(tmp_path / "photos", {"cat": 10, "dog": 10})
    first = load_splits(root, val_split=0.2, seed=1)
    assert isinstance(first.record, SplitRecord) and len(first.val) == 4 and len(first.train) == 16
    record = first.record.write(tmp_path / "split.json")
    assert SplitRecord.read(record) == first.record
    # The same seed and record: the same images, whatever the new seed would draw.
    again = load_splits(root, val_split=0.5, seed=9, split_record=record)
    assert [p for p, _ in again.val.samples] == [p for p, _ in first.val.samples]
    assert "changed" not in again.note
    # A new image trains; a removed val image is gone from val; nothing else moves.
    gone = Path(first.val.samples[0][0])
    gone.unlink()
    Image.new("RGB", (12, 10)).save(root / "cat" / "new.png")
    changed = load_splits(root, val_split=0.2, seed=1, split_record=record)
    assert [p for p, _ in changed.val.samples] == [p for p, _ in first.val.samples[1:]]
    assert str(root / "cat" / "new.png") in {p for p, _ in changed.train.samples}
    assert "1 new image(s) train, 1 recorded image(s) are gone" in changed.note


def test_train_without_val_is_split_and_too_few_images_is_an_error(tmp_path):
    root = tmp_path / "d"
    flat_root(root / "train", {"a": 5, "b": 5})
    splits = load_splits(root, val_split=0.2, seed=0)
    assert len(splits.val) == 2 and splits.train.root == root / "train"
    assert load_splits(root, val_split=0.0, seed=0).val is None
    single = flat_root(tmp_path / "single", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="--val-split 0"):
        load_splits(single, val_split=0.1)
    with pytest.raises(DatasetError, match=r"\[0, 1\)"):
        load_splits(root, val_split=1.5)


def imgrec(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "imgrec", *args], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def shapes_root(tiny_shapes, tmp_path_factory) -> Path:
    """The tiny shapes' train and val images together in one class-folder root (12 per class)."""
    root = tmp_path_factory.mktemp("flat") / "shapes"
    for split in ("train", "val"):
        for file in (tiny_shapes / split).glob("*/*"):
            (root / file.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(file, root / file.parent.name / f"{split}-{file.name}")
    return root


def test_a_flat_root_trains_resumes_and_evaluates_on_the_recorded_split(shapes_root, tmp_path):
    out = tmp_path / "run"
    common = ("--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--out", str(out))
    first = imgrec("train", "--data", str(shapes_root), "--epochs", "1", *common)
    assert "has no val/: 3 images (0.1 of each class, seed 0) validate, 33 train" in first.stdout
    record = SplitRecord.read(out / "split.json")
    assert len(record.val) == 3 and len(record.train) == 33 and record.classes == sorted(p.name for p in shapes_root.iterdir())
    resumed = imgrec("train", "--resume", str(out), "--epochs", "2")
    assert "as recorded in" in resumed.stdout and "changed" not in resumed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_images"] for r in rows] == [3, 3]
    report = tmp_path / "eval.json"
    imgrec("evaluate", str(out), "--data", str(shapes_root), "--json", str(report))
    assert json.loads(report.read_text())["n"] == 3  # the held-out images, not all 36


def test_val_split_zero_trains_on_everything_without_validation(shapes_root, tmp_path):
    out = tmp_path / "all"
    done = imgrec("train", "--data", str(shapes_root), "--val-split", "0", "--epochs", "1", "--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--out", str(out))
    assert "all 36 images train, no validation" in done.stdout and "no validation set" in done.stdout
    card = json.loads((out / "model.json").read_text())
    assert "top1" not in card and card["epoch"] == 1
    assert (out / "model.safetensors").is_file()


def test_a_flat_folder_with_a_kaggle_style_csv_trains_evaluates_and_writes_a_submission(shapes_root, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,label"]
    for folder in sorted(shapes_root.iterdir()):
        for i, file in enumerate(sorted(folder.iterdir())):
            name = f"{folder.name}_{i:02d}{file.suffix}"
            shutil.copy(file, images / name)
            rows.append(f"{name},{folder.name}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    done = imgrec("train", "--data", str(images), "--labels", str(tmp_path / "train.csv"), "--epochs", "1", "--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--out", str(out))
    assert "3 images (0.1 of each class, seed 0) validate, 33 train" in done.stdout
    card = json.loads((out / "model.json").read_text())
    assert card["classes"] == sorted(p.name for p in shapes_root.iterdir())
    report = tmp_path / "eval.json"
    imgrec("evaluate", str(out), "--data", str(images), "--labels", str(tmp_path / "train.csv"), "--json", str(report))
    assert json.loads(report.read_text())["n"] == 3  # the run's held-out images of that folder
    submission = tmp_path / "submission.csv"
    imgrec("predict", str(out), str(images), "--submission", str(submission), "--submission-header", "id,label", "--format", "json")
    lines = submission.read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == 37
    assert {line.split(",")[0] for line in lines[1:]} == {row.split(",")[0] for row in rows[1:]}
    assert {line.split(",")[1] for line in lines[1:]} <= set(card["classes"])


def test_labels_files_name_their_classes_in_order(tmp_path):
    from imgrec.data.labels import labels_file_classes, read_labels_file

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "l.csv").write_text("image_id,target\na.png,10\nb.png,9\nc.png,10\n")
    assert labels_file_classes(tmp_path / "l.csv", tmp_path) == ["9", "10"]
    (tmp_path / "l.json").write_text(json.dumps({"a.png": "dog", "b.png": "cat", "c.png": "dog"}))
    classes = labels_file_classes(tmp_path / "l.json", tmp_path)
    assert classes == ["cat", "dog"]
    assert read_labels_file(tmp_path / "l.json", classes, tmp_path) == [(str(tmp_path / "a.png"), 1), (str(tmp_path / "b.png"), 0), (str(tmp_path / "c.png"), 1)]
