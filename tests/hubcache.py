"""A Hugging Face Hub cache in its on-disk layout (models--ORG--NAME/{blobs,snapshots,refs}),
filled with weights a test made: what the named-weights tests read offline. The ``hub`` fixture
(conftest.py) makes an empty one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from imgrec.models.factory import create_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG = "test_resnet.r160_in1k"  # a tiny timm architecture with a tag on the hub (timm/test_resnet.r160_in1k)


def hub_file(cache: Path, repo: str, filename: str, data: bytes, commit: str = COMMIT) -> Path:
    """``data`` as ``filename`` of ``repo`` at ``commit`` in a hub cache (blob + snapshot link + refs/main)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return link


def made_weights(architecture: str = "test_resnet", seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model(architecture, num_classes=1000)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()
