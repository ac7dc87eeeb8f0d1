"""The model card: model.json and backbone.json read and written by one typed class (imgrec.card),
the first layout (runs trained before the card had a version) included.

tests/data/model_v1.json and backbone_v1.json are the files an earlier imgrec wrote for a
test_resnet trained one epoch at 32 px with an EMA, and pretrained one epoch with SimCLR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import imgrec
from imagefiles import photo
from imgrec.card import CARD_VERSION, ModelCard
from imgrec.config import DataConfig
from imgrec.models.factory import create_model, resolve_weights
from imgrec.recipe import resolve_data_config

DATA = Path(__file__).parent / "data"
CLASSES = ["circle", "square", "triangle"]
NAMES = {"circle": "a round shape", "square": "a square", "triangle": "three sides"}


def test_a_first_layout_model_json_reads_into_a_card() -> None:
    card = ModelCard.read(DATA / "model_v1.json")
    assert card.architecture == "test_resnet" and card.classes == CLASSES and card.num_classes == 3
    data = card.data_config
    assert (data.img_size, data.crop_pct, data.interpolation, data.mean, data.std) == (32, 1.0, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert card.metrics == {"top1": pytest.approx(100 / 3), "top5": 100.0, "epoch": 1}
    assert card.weights == "ema" and card.class_names == NAMES and card.pretrained is None
    # Written again, it is the same file with its version added: readers of the flat keys see no change.
    assert card.to_dict() == {**json.loads((DATA / "model_v1.json").read_text()), "format_version": CARD_VERSION}


def test_a_first_layout_backbone_json_reads_into_a_card() -> None:
    card = ModelCard.read(DATA / "backbone_v1.json")
    assert card.architecture == "test_resnet" and card.classes == [] and card.num_classes == 0
    assert (card.method, card.feature_dim, card.epochs) == ("simclr", 96, 1)
    assert card.data_config.img_size == 32 and card.data_config.crop_pct == 0.95
    assert set(card.metrics) == {"epoch", "loss", "knn_top1", "knn_top5"} and card.metrics["epoch"] == 1
    assert card.to_dict() == {**json.loads((DATA / "backbone_v1.json").read_text()), "format_version": CARD_VERSION}
    assert "num_classes" not in card.to_dict() and "input_size" not in card.to_dict()  # a backbone has no classifier


def test_a_model_directory_of_the_first_layout_still_predicts(tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    run.mkdir()
    shutil.copy(DATA / "model_v1.json", run / "model.json")
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    classifier = imgrec.load(run, device="cpu", backend="eager")
    assert classifier.classes == CLASSES and classifier.data_config.img_size == 32
    photo(50, 40, 1).save(tmp_path / "x.jpg")
    [prediction] = classifier.predict([tmp_path / "x.jpg"], topk=2)
    assert prediction.error is None and len(prediction.labels) == 2
    assert prediction.names == [NAMES[label] for label in prediction.labels]
    with torch.no_grad():
        assert torch.equal(classifier.model.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_fine_tuning_reads_the_preprocessing_of_a_first_layout_backbone(tmp_path: Path) -> None:
    run = tmp_path / "old-pretrain"
    run.mkdir()
    shutil.copy(DATA / "backbone_v1.json", run / "backbone.json")
    backbone = create_model("test_resnet", num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(run / "backbone.safetensors"))
    weights, card = resolve_weights(run)
    assert weights == run / "backbone.safetensors" and card.architecture == "test_resnet"
    model = create_model("test_resnet", num_classes=3)
    assert resolve_data_config(model).img_size == 160  # the architecture's own size...
    assert resolve_data_config(model, card=card).img_size == 32  # ...gives way to the size the backbone was pretrained at
    assert resolve_data_config(model, card=card, img_size=48).img_size == 48  # and a flag wins over both


def test_a_card_that_states_part_of_the_preprocessing(tmp_path: Path) -> None:
    """Fine-tuning takes from a card only what it states; inference refuses a card that does not say how to feed the model."""
    partial = ModelCard.from_dict({"architecture": "test_resnet", "img_size": 48})
    model = create_model("test_resnet", num_classes=0)
    config = resolve_data_config(model, card=partial)
    assert (config.img_size, config.crop_pct, config.mean) == (48, 0.95, (0.5, 0.5, 0.5))  # the rest is the architecture's
    run = tmp_path / "hand-written"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"architecture": "test_resnet", "classes": ["a", "b"], "img_size": 48}))
    with pytest.raises(ValueError, match="does not state crop_pct, interpolation, mean, std"):
        imgrec.load(run)


def test_a_card_round_trips_through_its_json(tmp_path: Path) -> None:
    card = ModelCard(
        architecture="resnet18", data_config=DataConfig(img_size=96, crop_pct=0.9, interpolation="bicubic"), classes=["a", "b"],
        class_names={"a": "an a"}, metrics={"top1": 50.0, "top5": 100.0, "epoch": 3}, weights="model", pretrained="runs/ssl",
    )  # fmt: skip
    path = card.write(tmp_path)
    assert path == tmp_path / "model.json"
    written = json.loads(path.read_text())
    assert written["format_version"] == CARD_VERSION and written["input_size"] == [3, 96, 96] and written["num_classes"] == 2
    assert written["img_size"] == 96 and written["classes"] == ["a", "b"] and written["top1"] == 50.0 and written["pretrained"] == "runs/ssl"
    assert ModelCard.read(tmp_path) == card


def test_cards_imgrec_cannot_read_are_refused_with_the_file_named(tmp_path: Path) -> None:
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format_version": CARD_VERSION + 1, "architecture": "resnet18"}))
    with pytest.raises(ValueError, match=f"newer.json has card format {CARD_VERSION + 1}.*upgrade imgrec"):
        ModelCard.read(newer)
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({"name": "something else"}))
    with pytest.raises(ValueError, match="stranger.json is not an imgrec model card"):
        ModelCard.read(stranger)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        ModelCard.read(broken)
    with pytest.raises(FileNotFoundError, match="no model.json"):
        ModelCard.read(tmp_path)
