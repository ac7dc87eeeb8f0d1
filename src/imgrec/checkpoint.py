"""Atomic checkpoints for exact resume, and the model directory that every later step reads.

``RUN/last.pt`` holds everything needed to continue a run: model, optimizer, scheduler, EMA,
grad scaler, the epoch, every RNG state and the resolved config. It is written to a temporary
file in the same folder, fsynced, then renamed over the old one, so a crash at any moment
leaves either the old or the new checkpoint on disk, never a torn one. It is read with
``weights_only=True``: tensors and plain containers only, nothing unpickled runs code.

The model directory is what predict, evaluate, export and serve take: ``model.safetensors``
(a plain timm state dict, so ``timm.create_model(arch, num_classes=N)`` loads it without imgrec)
and ``model.json`` (architecture, class names in index order, preprocessing, the accuracy).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.utils import atomic_write, write_json

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
SKIP_LOG_NAME = "skipped.jsonl"
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "model.json"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: a run writes {CHECKPOINT_NAME} at the end of each epoch")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in a form ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(
    run: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: dict[str, Any], *, weights_name: str = WEIGHTS_NAME, info_name: str = INFO_NAME
) -> Path:
    """Write ``run/model.safetensors`` (plain state dict) and ``run/model.json``, each atomically
    (a pretraining run names them backbone.safetensors and backbone.json)."""
    from safetensors.torch import save

    run = Path(run)
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"architecture": str(info.get("architecture", "")), "format": "pt"})
    atomic_write(run / weights_name, lambda f: f.write(blob))
    write_json(run / info_name, info)
    return run


def read_model_info(run: str | os.PathLike) -> dict[str, Any]:
    run = Path(run)
    path = run / INFO_NAME
    if not path.is_file():
        hint = " (the run has not finished an epoch yet?)" if (run / CHECKPOINT_NAME).exists() else ""
        raise FileNotFoundError(f"{run} is not a model directory: no {INFO_NAME}{hint}. Pass the --out folder of `imgrec train`.")
    return json.loads(path.read_text(encoding="utf-8"))


def load_model_dir(run: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model (CPU, eval mode) and its model.json; only safetensors and JSON are read."""
    from safetensors.torch import load_file

    from imgrec.models.factory import create_model

    run = Path(run)
    info = read_model_info(run)
    model = create_model(info["architecture"], num_classes=len(info["classes"]))
    weights = run / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{run} has {INFO_NAME} but no {WEIGHTS_NAME}")
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), info


__all__ = [
    "CHECKPOINT_NAME",
    "INFO_NAME",
    "METRICS_NAME",
    "SKIP_LOG_NAME",
    "WEIGHTS_NAME",
    "load_checkpoint",
    "load_model_dir",
    "read_model_info",
    "rng_state",
    "save_checkpoint",
    "save_model_dir",
    "set_rng_state",
]
