"""Evaluation: logits over a loader, metrics against hand computation, labels files, eval datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from imagefiles import photo
from imgrec.data.folder import DatasetError, SkipLog
from imgrec.data.loader import create_loader
from imgrec.data.transforms import BatchNormalize, EvalTransform
from imgrec.engine.evaluate import (
    LabelledFiles,
    classification_metrics,
    collect_logits,
    evaluation_dataset,
    read_labels_file,
    write_confusion_png,
)

ANIMALS = ["cat", "dog", "fox", "owl"]


# --- classification_metrics ---------------------------------------------------------------------

# Six samples of four classes, built so that the top-1 prediction of each row is known:
# cat: one right, one taken for dog; dog: both right; fox: one right, one taken for owl; owl: none.
HAND_LOGITS = [
    [3.0, 1.0, 0.0, -1.0],  # cat -> cat
    [0.0, 2.0, 1.0, 0.0],  # cat -> dog
    [0.0, 4.0, 0.0, 0.0],  # dog -> dog
    [1.0, 0.0, 0.5, 2.0],  # fox -> owl
    [0.0, 0.0, 5.0, 1.0],  # fox -> fox
    [0.0, 3.0, 0.0, 0.0],  # dog -> dog
]
HAND_LABELS = [0, 0, 1, 2, 2, 1]


def manual_cross_entropy(rows: list[list[float]], labels: list[int]) -> float:
    losses = [math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(rows, labels)]
    return sum(losses) / len(losses)


def test_metrics_match_hand_computation():
    metrics = classification_metrics(torch.tensor(HAND_LOGITS), torch.tensor(HAND_LABELS), ANIMALS)
    assert metrics["n"] == 6
    assert metrics["top1"] == pytest.approx(100.0 * 4 / 6)
    assert metrics["top5"] == 100.0  # k = min(5, 4): every label is in the top 4 of 4
    assert metrics["loss"] == pytest.approx(manual_cross_entropy(HAND_LOGITS, HAND_LABELS), rel=1e-6)
    assert metrics["per_class"] == [
        {"class": "cat", "n": 2, "top1": 50.0},
        {"class": "dog", "n": 2, "top1": 100.0},
        {"class": "fox", "n": 2, "top1": 50.0},
        {"class": "owl", "n": 0, "top1": None},
    ]
    assert metrics["confusion"] == [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 0, 0],
    ]
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON types only


def test_top5_with_more_than_five_classes():
    ranked = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # class i is ranked (i + 1)-th
    logits = torch.tensor([ranked, ranked, ranked, ranked])
    labels = torch.tensor([4, 5, 0, 6])  # 5th: top-5 hit; 6th and 7th: misses; 1st: top-1 hit
    metrics = classification_metrics(logits, labels, [f"c{i}" for i in range(7)])
    assert metrics["top1"] == 25.0
    assert metrics["top5"] == 50.0
    assert metrics["confusion"][4] == [1, 0, 0, 0, 0, 0, 0]
    assert metrics["confusion"][6] == [1, 0, 0, 0, 0, 0, 0]
    assert metrics["loss"] == pytest.approx(manual_cross_entropy(logits.tolist(), labels.tolist()), rel=1e-6)


def test_ties_count_the_same_prediction_in_top1_and_confusion():
    logits = torch.zeros(5, 3)  # every class tied: whichever topk picks first must be used everywhere
    labels = torch.tensor([0, 1, 2, 0, 1])
    metrics = classification_metrics(logits, labels, ["a", "b", "c"])
    first = int(torch.zeros(1, 3).topk(1, dim=1).indices[0, 0])
    expected_hits = sum(label == first for label in labels.tolist())
    assert metrics["top1"] == pytest.approx(100.0 * expected_hits / 5)
    diagonal = sum(metrics["confusion"][i][i] for i in range(3))
    assert diagonal == expected_hits
    assert [row[first] for row in metrics["confusion"]] == [2, 2, 1]


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), r"2-D \[samples, classes\], got shape \(4,\)"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), r"3 columns but there are 4 class names"),
        (torch.zeros(2, 4), torch.zeros(3, dtype=torch.int64), r"one label per row of logits \(2\), got shape \(3,\)"),
        (torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64), r"1-D"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), r"1 label\(s\) outside 0..3, e.g. label 4 at position 1"),
        (torch.zeros(2, 4), torch.tensor([-1, 0]), r"outside 0..3, e.g. label -1 at position 0"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), r"integer class indices, got dtype torch.float32"),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), r"no samples"),
        (torch.tensor([[0.0, float("nan"), 0, 0], [0, 0, 0, 0]]), torch.tensor([0, 1]), r"1 of 2 rows of logits hold NaN"),
    ],
)
def test_metrics_reject_bad_inputs(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(logits, labels, ANIMALS)


def test_metrics_reject_empty_class_list():
    with pytest.raises(ValueError, match="class list is empty"):
        classification_metrics(torch.zeros(2, 0), torch.zeros(2, dtype=torch.int64), [])


# --- write_confusion_png ------------------------------------------------------------------------


def test_confusion_png_is_a_readable_image(tmp_path: Path):
    confusion = classification_metrics(torch.tensor(HAND_LOGITS), torch.tensor(HAND_LABELS), ANIMALS)["confusion"]
    path = write_confusion_png(confusion, ANIMALS, tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 300
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 10  # a drawn figure, not a blank canvas


def test_confusion_png_for_many_classes_has_a_pixel_per_class(tmp_path: Path):
    classes = [f"class_{i}" for i in range(150)]
    confusion = torch.eye(150, dtype=torch.int64).mul(3).tolist()
    path = write_confusion_png(confusion, classes, tmp_path / "big.png")
    with Image.open(path) as image:
        assert image.height >= 150


def test_confusion_png_rejects_a_mismatched_matrix(tmp_path: Path):
    with pytest.raises(ValueError, match="must be 4 x 4 for 4 classes"):
        write_confusion_png([[1, 0], [0, 1]], ANIMALS, tmp_path / "x.png")


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


def make_class_folders(root: Path, counts: dict[str, int]) -> None:
    for seed, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            photo(12, 10, 10 * seed + i).save(root / name / f"{i}.jpg")


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


# --- collect_logits -----------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Dropout makes train mode visible: only in eval mode do two calls agree.
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 3))


@pytest.fixture
def batches() -> tuple[torch.Tensor, torch.Tensor, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0])
    return images, labels, DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=False)


NORMALIZE = BatchNormalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_collect_logits_matches_the_model_in_order(batches):
    images, labels, loader = batches
    model = tiny_model().train()
    logits, targets = collect_logits(model, loader, device=torch.device("cpu"), normalize=NORMALIZE)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert targets.dtype == torch.int64 and torch.equal(targets, labels)
    assert model.training  # restored
    with torch.no_grad():
        expected = model.eval()(NORMALIZE(images))
    torch.testing.assert_close(logits, expected)


def test_collect_logits_under_autocast_keeps_eval_mode(batches):
    images, _, loader = batches
    model = tiny_model().eval()
    logits, _ = collect_logits(model, loader, device=torch.device("cpu"), normalize=NORMALIZE, autocast_dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    assert not model.training
    with torch.no_grad():
        expected = model(NORMALIZE(images))
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


def test_collect_logits_restores_mode_after_an_error_and_rejects_empty_loaders(batches):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        collect_logits(model, batches[2], device=torch.device("cpu"), normalize=NORMALIZE)
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        collect_logits(tiny_model(), [], device=torch.device("cpu"), normalize=NORMALIZE)


def test_end_to_end_folder_to_metrics(tmp_path: Path):
    root = tmp_path / "eval"
    make_class_folders(root, {"cat": 2, "fox": 3})
    dataset = evaluation_dataset(root, ANIMALS, EvalTransform(img_size=8, crop_pct=1.0))
    loader = create_loader(dataset, batch_size=2, train=False, num_workers=0, pin_memory=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with torch.no_grad():  # a model that always answers "fox"
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    logits, labels = collect_logits(model, loader, device=torch.device("cpu"), normalize=NORMALIZE)
    metrics = classification_metrics(logits, labels, ANIMALS)
    assert labels.tolist() == [0, 0, 2, 2, 2]
    assert metrics["top1"] == 60.0
    assert [c["top1"] for c in metrics["per_class"]] == [0.0, None, 100.0, None]
    assert metrics["confusion"] == [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]]
