"""ImageFolder scanning, split loading, bad-file skipping and the shared SkipLog."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.data.decode import load_rgb
from imgrec.data.folder import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageFolderDataset,
    SkipLog,
    find_classes,
    iter_image_files,
    read_class_index,
    scan_image_folder,
    write_class_index,
)
from imgrec.data.loader import create_loader
from imgrec.data.splits import check_same_classes, load_splits, split_dirs
from imgrec.data.transforms import EvalTransform

FORMAT_BY_SUFFIX = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def save_image(path: Path, colour=(128, 64, 32), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = FORMAT_BY_SUFFIX[path.suffix.lower()]
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def save_bad(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not an image " * 10)
    return path


def colour_for(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 10 * i % 256, 100)


def make_flat_folder(root: Path, n: int, bad: set[int], classes=("a", "b")) -> list[Path]:
    """``n`` PNGs named 000..n-1 spread over ``classes`` in sorted order; indices in ``bad`` are garbage."""
    paths = []
    per_class = -(-n // len(classes))
    for i in range(n):
        path = root / classes[i // per_class] / f"{i:03d}.png"
        if i in bad:
            save_bad(path)
        else:
            save_image(path, colour_for(i), size=(16, 16))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- scanning


def test_scan_classes_targets_extensions_hidden_and_nested(tmp_path):
    root = tmp_path / "data"
    expected = [
        save_image(root / "cat" / "a.JPG"),
        save_image(root / "cat" / "b.Png"),
        save_image(root / "cat" / "deep" / "deeper" / "c.jpeg"),
        save_image(root / "cat" / "sub" / "d.webp"),
        save_image(root / "dog" / "e.bmp"),
        save_image(root / "dog" / "f.gif"),
        save_image(root / "dog" / "g.tif"),
        save_image(root / "dog" / "h.TIFF"),
        save_image(root / "zebra" / "i.jpg"),
    ]
    # ignored: hidden files, hidden folders (in a class and at the top), non-image files
    save_image(root / "cat" / ".hidden.jpg")
    save_image(root / "cat" / ".cache" / "thumb.jpg")
    save_image(root / ".trash" / "x.jpg")
    (root / "cat" / "notes.txt").write_text("notes")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "README.md").write_text("a file at the top is not a class")

    assert find_classes(root) == ["cat", "dog", "zebra"]
    samples, classes = scan_image_folder(root)
    assert classes == ["cat", "dog", "zebra"]
    assert sorted(samples) == sorted([(str(p), 0) for p in expected[:4]] + [(str(p), 1) for p in expected[4:8]] + [(str(expected[8]), 2)])

    dataset = ImageFolderDataset(root, skip_log=SkipLog(tmp_path / "skip.jsonl"))
    assert dataset.classes == ["cat", "dog", "zebra"]
    assert dataset.class_to_idx == {"cat": 0, "dog": 1, "zebra": 2}
    assert len(dataset) == 9
    assert dataset.targets == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert sorted(p for p, _ in dataset.samples) == sorted(str(p) for p in expected)
    # every extension in IMAGE_EXTENSIONS is covered by the files above
    assert {p.suffix.lower() for p in expected} == set(IMAGE_EXTENSIONS)


def test_iter_image_files_sorted_and_filtered(tmp_path):
    folder = tmp_path / "cls"
    b = save_image(folder / "b.jpg")
    a = save_image(folder / "a.PNG")
    nested = save_image(folder / "n" / "c.gif")
    save_image(folder / ".h.jpg")
    save_image(folder / ".hidden_dir" / "z.jpg")
    (folder / "x.txt").write_text("x")
    assert iter_image_files(folder) == sorted([a, b, nested])


def test_dataset_without_transform_returns_rgb_image_and_label(tmp_path):
    root = tmp_path / "data"
    save_image(root / "a" / "x.png", (1, 2, 3), size=(5, 4))
    save_image(root / "b" / "y.png", (200, 100, 50), size=(6, 7))
    dataset = ImageFolderDataset(root, skip_log=SkipLog(tmp_path / "skip.jsonl"))
    image, label = dataset[1]
    assert label == 1
    assert image.mode == "RGB" and image.size == (6, 7)
    assert image.getpixel((0, 0)) == (200, 100, 50)


def test_dataset_with_transform_returns_transform_output(tmp_path):
    root = tmp_path / "data"
    save_image(root / "a" / "x.png", (7, 8, 9), size=(50, 40))
    save_image(root / "b" / "y.jpg", (200, 100, 50), size=(40, 60))
    dataset = ImageFolderDataset(root, EvalTransform(img_size=32), skip_log=SkipLog(tmp_path / "skip.jsonl"))
    image, label = dataset[0]
    assert isinstance(image, torch.Tensor)
    assert image.dtype == torch.uint8
    assert image.shape == (3, 32, 32)
    assert label == 0
    assert image[:, 16, 16].tolist() == [7, 8, 9]
    assert dataset[1][0].shape == (3, 32, 32) and dataset[1][1] == 1


# ----------------------------------------------------------------------------- errors


def test_missing_root_is_dataset_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as info:
        ImageFolderDataset(missing)
    assert str(missing) in str(info.value)


def test_root_that_is_a_file_is_dataset_error(tmp_path):
    file = tmp_path / "file.jpg"
    save_image(file)
    with pytest.raises(DatasetError, match="is a file") as info:
        find_classes(file)
    assert str(file) in str(info.value)


def test_root_without_class_folders_is_dataset_error(tmp_path):
    root = tmp_path / "flat"
    save_image(root / "a.jpg")  # images directly in root, no class folders
    (root / ".hidden").mkdir()
    with pytest.raises(DatasetError, match="no class folders") as info:
        ImageFolderDataset(root)
    assert str(root) in str(info.value)


def test_class_folder_without_images_is_dataset_error(tmp_path):
    root = tmp_path / "data"
    save_image(root / "full" / "a.jpg")
    (root / "empty").mkdir()
    (root / "textonly").mkdir()
    (root / "textonly" / "readme.txt").write_text("no images here")
    save_image(root / "textonly" / ".hidden.jpg")
    with pytest.raises(DatasetError) as info:
        scan_image_folder(root)
    message = str(info.value)
    assert str(root) in message
    assert "2 class folder(s)" in message
    assert "empty, textonly" in message
    assert "full" not in message.split(":")[-1].split(".")[0]


def test_a_root_without_val_needs_two_images_in_a_class_to_hold_one_out(tmp_path):
    root = tmp_path / "imagenet"
    save_image(root / "train" / "a" / "x.jpg")
    with pytest.raises(DatasetError) as info:
        load_splits(root)
    message = str(info.value)
    assert str(root) in message
    assert "--val-split 0" in message
    only_val = tmp_path / "only-val"
    save_image(only_val / "val" / "a" / "x.jpg")
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_splits(only_val)
    with pytest.raises(DatasetError, match="does not exist"):
        split_dirs(tmp_path / "missing")


def test_train_and_val_with_different_classes_is_dataset_error(tmp_path):
    root = tmp_path / "imagenet"
    for name in ("cat", "dog", "fox"):
        save_image(root / "train" / name / "x.jpg")
    for name in ("cat", "dog", "owl"):
        save_image(root / "val" / name / "x.jpg")
    with pytest.raises(DatasetError) as info:
        load_splits(root)
    message = str(info.value)
    assert str(root) in message
    assert "only in train/: fox" in message
    assert "only in val/: owl" in message
    assert "cat" not in message and "dog" not in message


def test_check_same_classes_accepts_same_set_in_any_order(tmp_path):
    check_same_classes(["a", "b"], ["b", "a"], tmp_path)  # returns None, raises nothing
    with pytest.raises(DatasetError, match=r"only in val/: c"):
        check_same_classes(["a", "b"], ["a", "b", "c"], tmp_path)


def test_load_splits_val_uses_train_class_indices(tmp_path):
    root = tmp_path / "imagenet"
    for name in ("ant", "bee", "cow"):
        save_image(root / "train" / name / "t.png")
    for name in ("ant", "bee", "cow"):
        save_image(root / "val" / name / "v1.png")
    save_image(root / "val" / "cow" / "v2.png")
    splits = load_splits(root, eval_transform=EvalTransform(img_size=8), skip_log=SkipLog(tmp_path / "s.jsonl"))
    assert splits.classes == ["ant", "bee", "cow"]
    assert splits.train.classes == splits.val.classes == ["ant", "bee", "cow"]
    assert splits.val.class_to_idx == splits.train.class_to_idx == {"ant": 0, "bee": 1, "cow": 2}
    assert splits.train.targets == [0, 1, 2]
    assert splits.val.targets == [0, 1, 2, 2]
    assert [Path(p).relative_to(root / "val").parts[0] for p, _ in splits.val.samples] == ["ant", "bee", "cow", "cow"]
    assert splits.train.transform is None
    image, label = splits.val[3]
    assert label == 2 and image.shape == (3, 8, 8)


# ----------------------------------------------------------------------------- bad files


def test_bad_file_is_replaced_by_next_sample_and_logged_once(tmp_path):
    root = tmp_path / "data"
    paths = make_flat_folder(root, 10, bad={4})
    log = SkipLog(tmp_path / "skipped.jsonl")
    dataset = ImageFolderDataset(root, max_bad_fraction=0.2, skip_log=log)
    assert [p for p, _ in dataset.samples] == [str(p) for p in paths]

    for _ in range(3):
        image, label = dataset[4]
        next_image, next_label = dataset[5]
        assert label == next_label == dataset.targets[5] == 1  # index 4 is class "a", 5 is class "b"
        assert np.array_equal(np.asarray(image), np.asarray(next_image))
        assert image.getpixel((0, 0)) == colour_for(5)

    entries = log.entries()
    assert list(entries) == [str(paths[4])]
    assert "not an image" in entries[str(paths[4])]
    assert len(log) == 1
    assert len(log.path.read_text().splitlines()) == 1  # written once, not once per access
    # good samples are untouched
    assert dataset[3][0].getpixel((0, 0)) == colour_for(3)


def test_bad_last_file_wraps_to_first_sample(tmp_path):
    root = tmp_path / "data"
    paths = make_flat_folder(root, 6, bad={5})
    log = SkipLog(tmp_path / "skipped.jsonl")
    dataset = ImageFolderDataset(root, max_bad_fraction=0.2, skip_log=log)
    image, label = dataset[5]
    assert label == 0
    assert image.getpixel((0, 0)) == colour_for(0)
    assert list(log.entries()) == [str(paths[5])]


def test_too_many_bad_files_is_dataset_error(tmp_path):
    root = tmp_path / "data"
    make_flat_folder(root, 10, bad={2, 5, 8})
    dataset = ImageFolderDataset(root, max_bad_fraction=0.1, skip_log=SkipLog(tmp_path / "skipped.jsonl"))
    with pytest.raises(DatasetError) as info:
        for i in range(len(dataset)):
            dataset[i]
    message = str(info.value)
    assert "imgrec verify" in message
    assert str(root) in message
    assert "of 10 files" in message


def test_skip_log_is_shared_by_dataloader_workers(tmp_path):
    root = tmp_path / "data"
    bad = {3, 14}
    paths = make_flat_folder(root, 20, bad=bad, classes=("a", "b", "c", "d"))
    log = SkipLog(path=tmp_path / "skipped.jsonl")
    dataset = ImageFolderDataset(root, EvalTransform(img_size=16), max_bad_fraction=0.2, skip_log=log)
    assert len(dataset) == 20
    loader = create_loader(dataset, batch_size=4, train=False, num_workers=2, pin_memory=False)

    for _epoch in range(2):
        count = 0
        labels = []
        for images, targets in loader:
            assert images.dtype == torch.uint8
            assert images.ndim == 4 and images.shape[1:] == (3, 16, 16)
            assert targets.dtype == torch.int64
            assert targets.shape == (images.shape[0],)
            count += images.shape[0]
            labels.extend(targets.tolist())
        assert count == len(dataset)
        # a bad file's slot holds the next sample (3 -> 4, class "a"; 14 -> 15, class "c" -> "d")
        expected = [dataset.targets[i + 1] if i in bad else t for i, t in enumerate(dataset.targets)]
        assert expected[14] == 3 and dataset.targets[14] == 2
        assert labels == expected
        assert log.entries().keys() == {str(paths[i]) for i in bad}

    assert all("not an image" in reason for reason in log.entries().values())


def test_skip_log_entries_deduplicate_across_instances(tmp_path):
    path = tmp_path / "log" / "skipped.jsonl"
    first, second = SkipLog(path), SkipLog(path)  # e.g. two workers' copies
    assert first.entries() == {} and len(first) == 0
    first.record("/x.jpg", "broken")
    first.record("/x.jpg", "broken")
    second.record("/x.jpg", "broken again")
    second.record("/y.jpg", "empty")
    assert first.entries() == {"/x.jpg": "broken", "/y.jpg": "empty"}
    assert len(second) == 2


# ----------------------------------------------------------------------------- class index


def test_class_index_round_trip(tmp_path):
    classes = ["n01440764", "n01443537", "zebra crossing", "été"]
    path = tmp_path / "classes.json"
    write_class_index(path, classes)
    assert read_class_index(path) == classes
    import json

    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["class_to_idx"] == {name: i for i, name in enumerate(classes)}


def test_decoded_sample_matches_load_rgb(tmp_path):
    root = tmp_path / "data"
    path = save_image(root / "only" / "x.jpg", (90, 30, 200), size=(9, 9))
    dataset = ImageFolderDataset(root, skip_log=SkipLog(tmp_path / "s.jsonl"))
    image, label = dataset[0]
    assert label == 0
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb(path)))


def test_every_odd_file_trains_or_is_skipped(odd_folder, tmp_path):
    """The whole odd-file zoo through the train and eval presets and a 2-worker loader."""
    from imgrec.data.transforms import EvalTransform, TrainTransform

    root, good, bad = odd_folder
    for transform in (TrainTransform(img_size=32, auto_augment="trivial"), EvalTransform(img_size=32)):
        log = SkipLog(tmp_path / f"{type(transform).__name__}.jsonl")
        dataset = ImageFolderDataset(root / "train", transform, max_bad_fraction=0.5, skip_log=log)
        batches = list(create_loader(dataset, batch_size=5, train=False, num_workers=2))
        images = torch.cat([b[0] for b in batches])
        assert images.shape == (len(dataset), 3, 32, 32) and images.dtype == torch.uint8
        assert set(log.entries()) == bad
