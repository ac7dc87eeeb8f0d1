"""Evaluation: logits over a loader, metrics against hand computation, the confusion matrix PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from imagefiles import make_class_folders
from imgrec.data.labels import evaluation_dataset
from imgrec.data.loader import create_loader
from imgrec.data.transforms import BatchNormalize, EvalTransform
from imgrec.engine.evaluate import classification_metrics, collect_logits
from imgrec.plots import write_confusion_png

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
        {"class": "cat", "n": 2, "top1": 50.0, "recall": 50.0, "precision": 100.0, "f1": pytest.approx(200 / 3)},
        {"class": "dog", "n": 2, "top1": 100.0, "recall": 100.0, "precision": pytest.approx(200 / 3), "f1": pytest.approx(80.0)},
        {"class": "fox", "n": 2, "top1": 50.0, "recall": 50.0, "precision": 100.0, "f1": pytest.approx(200 / 3)},
        {"class": "owl", "n": 0, "top1": None, "recall": None, "precision": 0.0, "f1": None},  # predicted once, wrongly
    ]
    assert metrics["balanced_accuracy"] == pytest.approx((50 + 100 + 50) / 3)  # owl has no images: left out
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


def test_precision_recall_f1_and_balanced_accuracy_from_the_confusion_matrix():
    from imgrec.engine.evaluate import classification_metrics

    # True classes: a a a a b b c. Predicted: a a a b b a b  (c never right, never predicted).
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 1])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    metrics = classification_metrics(logits, labels, ["a", "b", "c"])
    rows = {row["class"]: row for row in metrics["per_class"]}
    assert rows["a"]["recall"] == pytest.approx(75.0) and rows["a"]["precision"] == pytest.approx(75.0) and rows["a"]["f1"] == pytest.approx(75.0)
    assert rows["b"]["recall"] == pytest.approx(50.0) and rows["b"]["precision"] == pytest.approx(100 / 3)
    assert rows["b"]["f1"] == pytest.approx(2 * 50 * (100 / 3) / (50 + 100 / 3))
    assert (rows["c"]["recall"], rows["c"]["precision"], rows["c"]["f1"]) == (0.0, 0.0, 0.0)
    assert metrics["balanced_accuracy"] == pytest.approx((75 + 50 + 0) / 3)
    assert metrics["top1"] == pytest.approx(100 * 4 / 7)
    assert metrics["macro_f1"] == pytest.approx((75 + rows["b"]["f1"]) / 3)
