"""Where a run's settings come from, in one order: flags > YAML > the pretrained weights' card >
the architecture's defaults > the dataclass defaults.

``load_config`` merges the first two into a ``TrainConfig`` / ``PretrainConfig`` (the CLI calls it);
``resolve_data_config`` adds the last ones to the data config (train, pretrain, probe and
``imgrec inspect`` call it), so that a model fine-tuned from weights pretrained at 160 px is fed
160 px images unless told otherwise, and a timm architecture gets its own mean, std and crop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

import torch
import yaml

from imgrec.card import ModelCard
from imgrec.config import INTERPOLATIONS, PREPROCESSING, DataConfig, from_dict

C = TypeVar("C")


def load_config(cls: type[C], *, yaml_path: str | os.PathLike | None = None, flags: dict[str, Any] | None = None, data_flags: dict[str, Any] | None = None) -> C:
    """The ``cls`` config of the YAML file (if any) with every given flag on top.

    ``flags`` hold ``cls`` fields and ``data_flags`` ``DataConfig`` fields (into ``data_config``);
    a value of ``None`` was not given and leaves the YAML's value, or the default, in place.
    """
    values: dict[str, Any] = {}
    if yaml_path:
        with open(yaml_path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{yaml_path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{yaml_path} must hold a mapping of {cls.__name__} fields, e.g. 'epochs: 10'")
    values.update({name: value for name, value in (flags or {}).items() if value is not None})
    data_config = dict(values.get("data_config") or {})
    data_config.update({name: value for name, value in (data_flags or {}).items() if value is not None})
    values["data_config"] = data_config
    return from_dict(cls, values, source=str(yaml_path) if yaml_path else "flags")


def architecture_preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """The preprocessing timm's config gives ``model``'s architecture (size, crop, interpolation, mean, std)."""
    from timm.data import resolve_model_data_config

    timm_config = resolve_model_data_config(model)
    return {
        "img_size": int(timm_config["input_size"][-1]),
        "crop_pct": float(timm_config["crop_pct"]),
        "interpolation": timm_config["interpolation"] if timm_config["interpolation"] in INTERPOLATIONS else "bicubic",
        "mean": tuple(timm_config["mean"]),
        "std": tuple(timm_config["std"]),
    }


def resolve_data_config(
    model: torch.nn.Module | None = None, base: DataConfig | None = None, *, card: ModelCard | None = None, **given: Any
) -> DataConfig:
    """The data config of a run: ``given`` fields (``None`` = not given), else the preprocessing of
    the pretrained weights' ``card``, else ``model``'s architecture defaults, else ``base`` (or
    ``DataConfig()``). Only ``img_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std`` come
    from the card and the architecture; the augmentation is the recipe's."""
    config = base or DataConfig()
    if model is not None:
        config = dataclasses.replace(config, **architecture_preprocessing(model))
    if card is not None:
        config = dataclasses.replace(config, **{name: getattr(card.data_config, name) for name in PREPROCESSING if name in card.stated})
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


__all__ = ["architecture_preprocessing", "load_config", "resolve_data_config"]
