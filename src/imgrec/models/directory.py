"""Model directories: the weights (safetensors, a plain timm state dict) beside their card.

``save_model_dir`` writes both atomically (training writes them whenever validation improves,
pretraining at each epoch's end); ``load_model_dir`` builds the card's architecture and loads the
weights, reading only safetensors and JSON, so a model directory of a timm model runs no code
(one of a model of your own imports its class, from the file or module its card names).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from imgrec.card import MODEL_CARD, MODEL_WEIGHTS, ModelCard
from imgrec.models.factory import create_model
from imgrec.utils import atomic_write


def save_model_dir(
    run: str | os.PathLike, state_dict: dict[str, torch.Tensor], card: ModelCard, *, weights_name: str = MODEL_WEIGHTS, card_name: str = MODEL_CARD
) -> Path:
    """Write ``run/model.safetensors`` (plain state dict) and ``run/model.json``, each atomically
    (a pretraining run names them backbone.safetensors and backbone.json)."""
    from safetensors.torch import save

    run = Path(run)
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"architecture": card.architecture, "format": "pt"})
    atomic_write(run / weights_name, lambda f: f.write(blob))
    card.write(run, card_name)
    return run


def load_model_dir(run: str | os.PathLike) -> tuple[torch.nn.Module, ModelCard]:
    """The trained model (CPU, eval mode) and its card; only safetensors and JSON are read."""
    from safetensors.torch import load_file

    run = Path(run)
    card = ModelCard.read(run)
    card.check_preprocessing()
    model = create_model(card.architecture, num_classes=card.num_classes, model_args=card.model_args)
    weights = run / MODEL_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{run} has {MODEL_CARD} but no {MODEL_WEIGHTS}")
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), card


__all__ = ["load_model_dir", "save_model_dir"]
