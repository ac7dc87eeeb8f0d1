"""The model card: what a model directory says about its weights, typed, read and written here only.

A trained model directory holds ``model.safetensors`` (a plain timm state dict) and ``model.json``,
its card; a pretraining run holds ``backbone.safetensors`` and ``backbone.json``. The card names
the architecture, the classes in index order (none for a backbone) and their human-readable
names, the preprocessing an image needs to become the model's input, the metrics of the saved
weights, and where the weights came from. Predict, evaluate, export, benchmark, serve, probe and
fine-tuning all read it through ``ModelCard.read``; training writes it with ``ModelCard.write``.

The JSON is flat, so that a script without imgrec reads ``model.json["classes"]`` or
``["img_size"]`` directly; ``format_version`` tells this layout (2) from the first one (no
version key), which ``ModelCard`` still reads. ``num_classes`` and ``input_size`` are written for
such readers (timm's names) and derived, not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrec.config import PREPROCESSING, DataConfig, preprocessing
from imgrec.utils import write_json

CARD_VERSION = 2
MODEL_CARD, MODEL_WEIGHTS = "model.json", "model.safetensors"  # imgrec train
BACKBONE_CARD, BACKBONE_WEIGHTS = "backbone.json", "backbone.safetensors"  # imgrec pretrain
CHECKPOINT_NAME = "last.pt"  # the trainer's checkpoint: named here so that a reader can tell a run that has saved no model yet
DERIVED = ("num_classes", "input_size")  # written for readers without imgrec, computed from the fields


@dataclass
class ModelCard:
    """The description of one set of weights (a classifier's, or a pretrained backbone's)."""

    architecture: str  # the timm architecture the weights load into, or a model class (path/to/file.py:Net, package.module:Net)
    data_config: DataConfig  # its preprocessing fields (img_size, crop_pct, interpolation, mean, std) are the card's
    classes: list[str] = field(default_factory=list)  # the classifier's classes in index order; empty for a backbone
    class_names: dict[str, str] = field(default_factory=dict)  # class -> human-readable name (ImageNet's words), if known
    metrics: dict[str, Any] = field(default_factory=dict)  # of the saved weights: top1, top5, epoch; loss, knn_top1 for a backbone
    weights: str | None = None  # which copy the file holds: "model" or "ema" (the better on validation)
    pretrained: str | None = None  # the weights the run started from (a file, a run or a name), None for a random start
    pretrained_source: dict[str, str] = field(default_factory=dict)  # those weights' name, file, SHA-256 (and hub repo, revision)
    teacher: dict[str, str] = field(default_factory=dict)  # the teacher of distilled weights (a backbone, or a classifier trained with --teacher): name, architecture, file, SHA-256
    model_args: dict[str, Any] = field(default_factory=dict)  # a model class's constructor arguments
    method: str | None = None  # a backbone's self-supervised method
    feature_dim: int | None = None  # a backbone's pooled feature size
    epochs: int | None = None  # a backbone's planned pretraining epochs
    temperature: float | None = None  # the logits are divided by it before the softmax (imgrec calibrate); None: not calibrated
    calibration: dict[str, Any] = field(default_factory=dict)  # where the temperature was fitted and what it did: data, images, ece/nll before and after
    format_version: int = CARD_VERSION
    # The preprocessing fields the card states (a card read from a partial file may not state all);
    # fine-tuning takes only these from it, and inference needs all of them.
    stated: tuple[str, ...] = field(default=PREPROCESSING, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def img_size(self) -> int:
        return self.data_config.img_size

    def to_dict(self) -> dict[str, Any]:
        """The card's JSON form (flat; None and empty entries left out)."""
        payload: dict[str, Any] = {"format_version": self.format_version, "architecture": self.architecture}
        if self.classes:
            payload.update(num_classes=self.num_classes, classes=list(self.classes), input_size=[3, self.img_size, self.img_size])
        payload.update(preprocessing(self.data_config))
        payload.update(self.metrics)
        optional = {"class_names": self.class_names, "weights": self.weights, "pretrained": self.pretrained, "pretrained_source": self.pretrained_source, "teacher": self.teacher, "model_args": self.model_args, "method": self.method,
                    "feature_dim": self.feature_dim, "epochs": self.epochs, "temperature": self.temperature, "calibration": self.calibration}  # fmt: skip
        payload.update({k: v for k, v in optional.items() if v not in (None, {}, [])})
        return payload

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model card") -> ModelCard:
        """A card from its JSON form, either layout; an error naming ``source`` if it is not one."""
        if not isinstance(values, dict) or not isinstance(values.get("architecture"), str):
            raise ValueError(f"{source} is not an imgrec model card: it has no 'architecture'. Pass a model directory written by imgrec.")
        version = int(values.get("format_version", 1))
        if version > CARD_VERSION:
            raise ValueError(f"{source} has card format {version}, newer than this imgrec reads ({CARD_VERSION}): upgrade imgrec")
        fields = {f.name for f in dataclasses.fields(cls)} - {"data_config", "metrics", "format_version", "stated"}
        known = {name: values[name] for name in fields if name in values}
        data = {name: values[name] for name in PREPROCESSING if name in values}
        metrics = {k: v for k, v in values.items() if k not in fields | set(PREPROCESSING) | set(DERIVED) | {"format_version"}}
        temperature = known.get("temperature")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"{source}: temperature must be a number above 0, got {temperature!r}; run `imgrec calibrate` again or delete it")
        try:
            return cls(data_config=DataConfig(**data), metrics=metrics, stated=tuple(data), **known)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not a valid model card: {exc}") from None

    def check_preprocessing(self) -> None:
        """Refuse a card that does not say how an image becomes the model's input."""
        missing = [name for name in PREPROCESSING if name not in self.stated]
        if missing:
            raise ValueError(f"the model card of {self.architecture} does not state {', '.join(missing)}: add them to its model.json")

    def write(self, folder: str | os.PathLike, name: str = MODEL_CARD) -> Path:
        return write_json(Path(folder) / name, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike, name: str = MODEL_CARD) -> ModelCard:
        """The card of a model directory (``path/name``) or a card file named directly."""
        path = Path(path)
        file = path / name if path.is_dir() else path
        if not file.is_file():
            hint = " (the run has not finished an epoch yet?)" if (path / CHECKPOINT_NAME).exists() else ""
            raise FileNotFoundError(f"{path} is not a model directory: no {name}{hint}. Pass the --out folder of `imgrec train`.")
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file} is not valid JSON ({exc}): the model directory is damaged") from None
        return cls.from_dict(values, source=str(file))


__all__ = ["BACKBONE_CARD", "BACKBONE_WEIGHTS", "CARD_VERSION", "CHECKPOINT_NAME", "MODEL_CARD", "MODEL_WEIGHTS", "ModelCard"]
