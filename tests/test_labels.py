"""Labelled images that are not a plain ImageFolder: a flat folder with a labels file (CSV or
ILSVRC's integer list), or class folders holding some of a model's classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagefiles import make_class_folders, photo
from imgrec.data.folder import DatasetError, SkipLog
from imgrec.data.labels import LabelledFiles, evaluation_dataset, read_labels_file
from imgrec.data.transforms import EvalTransform

ANIMALS = ["cat", "dog", "fox", "owl"]


# --- read_labels_file ---------------------------------------------------------------------------


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """A flat folder of three images, written out of name order."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for seed, name in enumerate(["c.png", "a.png", "b.png"]):
        photo(12, 10, seed).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_class_names(tmp_path: Path, flat: Path):
    labels = write(tmp_path / "labels.csv", "b.png,dog\na.png,cat\n\n")
    assert read_labels_file(labels, ANIMALS, flat) == [(str(flat / "b.png"), 1), (str(flat / "a.png"), 0)]


def test_csv_with_indices_header_and_absolute_path(tmp_path: Path, flat: Path):
    labels = write(tmp_path / "labels.csv", f"filename,class\na.png, 3\n{flat / 'c.png'},0\n")
    assert read_labels_file(labels, ANIMALS, flat) == [(str(flat / "a.png"), 3), (str(flat / "c.png"), 0)]


def test_csv_class_name_wins_over_index(tmp_path: Path, flat: Path):
    labels = write(tmp_path / "labels.csv", "a.png,2\nb.png,1\n")  # "2" is a class name, "1" only an index
    assert read_labels_file(labels, ["10", "2"], flat) == [(str(flat / "a.png"), 1), (str(flat / "b.png"), 1)]


def test_ilsvrc_integer_list_follows_sorted_file_names(tmp_path: Path, flat: Path):
    labels = write(tmp_path / "ILSVRC2012_validation_ground_truth.txt", "3\n1\n4\n\n")
    assert read_labels_file(labels, ANIMALS, flat) == [
        (str(flat / "a.png"), 2),  # 1-based ids: 3 -> index 2
        (str(flat / "b.png"), 0),
        (str(flat / "c.png"), 3),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,dgo\n", r"labels\.txt, line 1: unknown class 'dgo'.*Did you mean 'dog'"),
        ("a.png,cat\nb.png,zebra\n", r"labels\.txt, line 2: unknown class 'zebra'.*Known classes: cat, dog, fox, owl"),
        ("a.png,cat\nb.png,4\n", r"labels\.txt, line 2: class index 4 is out of range.*indices 0..3"),
        ("a.png,-1\n", r"line 1: class index -1 is out of range"),
        ("a.png,cat\nmissing.png,dog\ngone.png,dog\n", r"line 2: image 'missing\.png' not found in .*flat \(1 more listed"),
        ("a.png,cat\nb.png,cat,extra\n", r"line 2: expected 2 columns filename,class, got 3"),
        ("a.png,cat\nb.png,dog\na.png,fox\n", r"line 3: 'a\.png' is listed twice \(first on line 1\)"),
        ("", r"labels\.txt is empty"),
        ("\n  \n", r"labels\.txt is empty"),
        ("filename,class\n", r"labels\.txt is empty: it has a header"),
        ("1\n2\n", r"labels\.txt has 2 labels but .*flat holds 3 images"),
        ("1\n2\n3\n4\n", r"has 4 labels but .* holds 3 images"),
        ("1\n0\n2\n", r"line 2: class id 0 is out of range: ILSVRC ids are 1-based.*1..4"),
        ("1\n5\n2\n", r"line 2: class id 5 is out of range"),
        ("1\nn01440764\n2\n", r"line 2 holds 'n01440764', not an integer"),
        ("1\n\n2\n3\n", r"line 2 is blank"),
    ],
)
def test_labels_file_errors(tmp_path: Path, flat: Path, text: str, message: str):
    labels = write(tmp_path / "labels.txt", text)
    with pytest.raises(ValueError, match=message):
        read_labels_file(labels, ANIMALS, flat)


def test_labels_file_or_folder_missing(tmp_path: Path, flat: Path):
    with pytest.raises(ValueError, match=r"labels file .*nope\.csv does not exist"):
        read_labels_file(tmp_path / "nope.csv", ANIMALS, flat)
    labels = write(tmp_path / "labels.csv", "a.png,cat\n")
    with pytest.raises(DatasetError, match=r"image folder .*elsewhere does not exist"):
        read_labels_file(labels, ANIMALS, tmp_path / "elsewhere")


# --- evaluation_dataset and LabelledFiles -------------------------------------------------------


def test_flat_folder_with_csv(tmp_path: Path, flat: Path):
    labels = write(tmp_path / "labels.csv", "filename,class\nc.png,owl\na.png,dog\n")
    dataset = evaluation_dataset(flat, ANIMALS, EvalTransform(img_size=8, crop_pct=1.0), labels=labels)
    assert isinstance(dataset, LabelledFiles)
    assert dataset.targets == [3, 1]
    assert dataset.classes == ANIMALS
    image, label = dataset[0]
    assert label == 3 and image.dtype == torch.uint8 and image.shape == (3, 8, 8)


def test_image_folder_with_a_subset_of_classes_uses_model_indices(tmp_path: Path):
    root = tmp_path / "subset"
    make_class_folders(root, {"dog": 2, "owl": 1})
    dataset = evaluation_dataset(root, ANIMALS, None)
    assert dataset.targets == [1, 1, 3]
    assert [Path(p).parent.name for p, _ in dataset.samples] == ["dog", "dog", "owl"]
    assert dataset[2][1] == 3 and dataset[2][0].mode == "RGB"


def test_dataset_root_uses_its_val_split(tmp_path: Path):
    make_class_folders(tmp_path / "data" / "train", {"cat": 1, "fox": 1})
    make_class_folders(tmp_path / "data" / "val", {"fox": 2})
    dataset = evaluation_dataset(tmp_path / "data", ANIMALS, None)
    assert dataset.root == tmp_path / "data" / "val"
    assert dataset.targets == [2, 2]


def test_folder_class_unknown_to_the_model(tmp_path: Path):
    make_class_folders(tmp_path / "zoo", {"cat": 1, "eel": 1, "yak": 1})
    with pytest.raises(
        DatasetError, match=r"2 class folder\(s\) in .*zoo are not classes of the model: eel, yak.*knows 4 classes"
    ):
        evaluation_dataset(tmp_path / "zoo", ANIMALS, None)


def test_folder_without_images(tmp_path: Path):
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images in the class folders"):
        evaluation_dataset(tmp_path / "hollow", ANIMALS, None)


def test_labelled_files_leave_bad_images_out(tmp_path: Path, flat: Path):
    (flat / "broken.png").write_bytes(b"not a png at all")
    samples = [(str(flat / "broken.png"), 0), (str(flat / "a.png"), 1)]
    log = SkipLog(tmp_path / "skipped.jsonl")
    dataset = LabelledFiles(samples, ANIMALS, root=flat, max_bad_fraction=0.5, skip_log=log)
    assert dataset[0] is None  # evaluation: counted nowhere, not as its neighbour
    image, label = dataset[1]
    assert label == 1 and image.size == (12, 10)
    assert list(log.entries()) == [str(flat / "broken.png")]
    replacing = LabelledFiles(samples, ANIMALS, root=flat, max_bad_fraction=0.5, skip_log=log, replace_bad=True)
    assert replacing[0][1] == 1  # the training behaviour: the next good sample
    strict = LabelledFiles(samples, ANIMALS, root=flat, max_bad_fraction=0.0, skip_log=SkipLog(tmp_path / "strict.jsonl"))
    with pytest.raises(DatasetError, match=r"1 of 2 files in .*flat are unreadable"):
        strict[0]
