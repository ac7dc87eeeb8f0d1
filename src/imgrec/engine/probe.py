"""``imgrec probe``: how good are a backbone's frozen features? kNN or a linear probe on top.

The backbone (a pretraining run, a trained model directory, a weights file, or ``random:ARCH``)
runs once over the train and val splits with the eval transform; the pooled features go to an
on-disk cache keyed by the weights' bytes, the data's files and the preprocessing, so that the
next probe of the same backbone on the same data starts from the cache. The classifier is then
trained on the features alone (``imgrec.engine.knn``): seconds, not an epoch of the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from imgrec.card import ModelCard
from imgrec.config import PREPROCESSING, DataConfig
from imgrec.data.folder import SkipLog
from imgrec.data.loader import create_loader
from imgrec.data.splits import load_splits
from imgrec.data.transforms import BatchNormalize, eval_transform
from imgrec.engine.evaluate import classification_metrics, collect_logits
from imgrec.engine.knn import choose_probe_lr, knn_scores, linear_probe
from imgrec.hardware import DTYPES, flush_denormals, resolve_device, resolve_precision
from imgrec.models.factory import create_model, locate_weights
from imgrec.progress import track
from imgrec.recipe import resolve_data_config
from imgrec.utils import atomic_write


@dataclass
class Backbone:
    """A feature extractor and where it came from (for the cache key and the report)."""

    model: torch.nn.Module  # timm model with num_classes=0: forward gives pooled features
    architecture: str
    source: str  # "random:ARCH" or the weights file
    digest: str  # sha256 of the weights file, or of "random:ARCH:seed"
    card: ModelCard | None  # stored with the weights (a run directory's), if any: their preprocessing


def load_backbone(spec: str | os.PathLike, model: str | None = None, seed: int = 0) -> Backbone:
    """The backbone named by ``spec``: ``random:ARCH`` (randomly initialised with ``seed``), a run
    directory (``backbone.json`` of ``imgrec pretrain`` or ``model.json`` of ``imgrec train``), or a
    weights file with ``model`` naming its architecture."""
    spec = str(spec)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        torch.manual_seed(seed)
        return Backbone(create_model(arch, num_classes=0), arch, spec, _sha256(f"{spec}:{seed}".encode()), None)
    weights = locate_weights(spec)
    card = weights.card
    arch = model or (card.architecture if card is not None else None)
    if not arch:
        raise ValueError(f"{spec} does not say which architecture it holds: pass --model ARCH")
    net = create_model(arch, num_classes=0, pretrained=weights)
    return Backbone(net, arch, str(weights.path), weights.source["sha256"], card)


def feature_cache_dir() -> Path:
    """``$IMGREC_CACHE/features``, else ``$XDG_CACHE_HOME/imgrec/features``, else ``~/.cache/imgrec/features``."""
    if os.environ.get("IMGREC_CACHE"):
        return Path(os.environ["IMGREC_CACHE"]) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgrec" / "features"


def dataset_fingerprint(dataset: Any) -> list[Any] | None:
    """What the dataset reads: every file with its size and modification time (shards: the shard
    files); None when a file cannot be stat'ed (remote shards, pipe: commands): not cacheable."""
    paths = [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else list(getattr(dataset, "shards", []))
    labels = [label for _, label in dataset.samples] if hasattr(dataset, "samples") else []
    entries = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        entries.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return [entries, labels, list(dataset.classes), dataset.max_pixels]


def extract_features(
    backbone: Backbone, dataset: Any, config: DataConfig, *, split: str, batch_size: int = 256, workers: int | None = None,
    device: str = "auto", precision: str = "auto", cache: Path | None = None, loader: str = "fast", console: Console | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 features [N, D], int64 labels [N]) of ``dataset`` through the frozen backbone, cached.

    The cache file's name is a hash of the weights and architecture, the dataset's files, the
    preprocessing and the precision and device type the features were computed with;
    ``cache=None`` turns caching off, and so does data that cannot be fingerprinted (remote
    shards). Unreadable images are left out and recorded in the dataset's skip log.
    """  # fmt: skip
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    key, data = None, dataset_fingerprint(dataset) if cache is not None else None
    if data is not None:
        fingerprint = {
            "weights": backbone.digest, "architecture": backbone.architecture, "data": data,
            "preprocessing": [getattr(config, k) for k in PREPROCESSING], "loader": loader, "precision": precision, "device": dev.type,
        }  # fmt: skip
        key = cache / f"{split}-{_sha256(json.dumps(fingerprint, default=list).encode())[:32]}.safetensors"
        if key.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(key))
            return tensors["features"], tensors["labels"]
    flush_denormals(dev)
    dataset.transform = eval_transform(config, loader)
    dataset.replace_bad = False
    data = create_loader(dataset, batch_size=batch_size, train=False, num_workers=workers, skip_none=True, channels_last=True)
    model = backbone.model.to(dev, memory_format=torch.channels_last)
    normalize = BatchNormalize.from_config(config, channels_last=True).to(dev)
    started = time.perf_counter()
    with contextlib.closing(track(data, f"{split} features", console=console, unit="batches")) as shown:  # the bar goes if a batch fails
        features, labels = collect_logits(model, shown, device=dev, normalize=normalize, autocast_dtype=DTYPES[precision])
    if console is not None:
        console.print(f"{split}: {len(labels)} images -> {features.shape[1]}-d features in {time.perf_counter() - started:.1f} s", highlight=False)
    if key is not None:
        from safetensors.torch import save

        key.parent.mkdir(parents=True, exist_ok=True)
        blob = save({"features": features.contiguous(), "labels": labels.contiguous()})
        atomic_write(key, lambda f: f.write(blob))
    return features, labels


def probe(
    backbone: str | os.PathLike,
    data: str | os.PathLike,
    *,
    method: str = "knn",
    model: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    epochs: int = 100,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    loader: str = "fast",
    seed: int = 0,
    cache: bool | str | os.PathLike = True,
    data_config: dict[str, Any] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 (percent) of a kNN (``method="knn"``) or linear probe of frozen features on ``data``.

    ``data`` is a root holding train/ and val/ (folders or shards): the classifier learns on the
    train features and is scored on the val features; unreadable images are left out (listed
    under ``skipped``; a cache hit lists none, as nothing was read). Preprocessing: what the weights were
    trained with (backbone.json / model.json), else the architecture's, then ``data_config``.
    ``cache`` is True (the default folder, ``feature_cache_dir()``), a folder, or False.
    The linear probe's ``lr``, if not given, is chosen among ``PROBE_LRS`` on a held-out fifth of
    the train features (``choose_probe_lr``); the result holds it (``lr``) and each rate's
    held-out top-1 (``lr_scores``).
    """
    if method not in ("knn", "linear"):
        raise ValueError(f"probe method must be knn or linear, got {method!r}")
    net = load_backbone(backbone, model, seed)
    config = resolve_data_config(net.model, card=net.card, **(data_config or {}))
    cache_dir = None if cache is False else (feature_cache_dir() if cache is True else Path(cache))
    options = {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision, "cache": cache_dir, "loader": loader, "console": console}
    (train_x, train_y), (val_x, val_y), classes, skipped = split_features(net, data, config, seed, options)
    started = time.perf_counter()
    dev = resolve_device(device)
    chosen: dict[str, Any] = {}
    if method == "knn":
        scores = knn_scores(train_x.to(dev), train_y, val_x, len(classes), k=k, temperature=temperature)
    else:
        train_x, train_y, fit = train_x.to(dev), train_y.to(dev), {"epochs": epochs, "weight_decay": weight_decay, "seed": seed}
        if lr is None:
            lr, held_out = choose_probe_lr(train_x, train_y, len(classes), **fit)
            chosen["lr_scores"] = {f"{rate:g}": top1 for rate, top1 in held_out.items()}
        chosen["lr"] = lr
        scores = linear_probe(train_x, train_y, val_x.to(dev), len(classes), lr=lr, **fit)
    metrics = classification_metrics(scores, val_y, classes)
    return {
        "method": method, "backbone": net.source, "architecture": net.architecture, "top1": metrics["top1"], "top5": metrics["top5"],
        "train_images": int(train_y.numel()), "val_images": int(val_y.numel()), "feature_dim": int(train_x.shape[1]),
        "classifier_seconds": round(time.perf_counter() - started, 3), "per_class": metrics["per_class"], "skipped": skipped, **chosen,
    }  # fmt: skip


def split_features(backbone: Backbone, data: str | os.PathLike, config: DataConfig, seed: int, options: dict[str, Any]) -> tuple[Any, Any, list[str], list[dict[str, str]]]:
    """((train features, labels), (val features, labels), classes, unreadable files) of the dataset root ``data``."""
    skip_log = SkipLog()
    try:
        splits = load_splits(data, seed=seed, skip_log=skip_log, max_pixels=config.max_pixels, max_bad_fraction=config.max_bad_fraction)
        train = extract_features(backbone, splits.train, config, split="train", **options)
        val = extract_features(backbone, splits.val, config, split="val", **options)
        skipped = [{"path": path, "reason": reason} for path, reason in skip_log.entries().items()]
    finally:
        skip_log.path.unlink(missing_ok=True)
    console = options.get("console")
    if skipped and console is not None:
        console.print(f"{len(skipped)} unreadable file(s) left out, e.g. {skipped[0]['path']}: {skipped[0]['reason']}", style="yellow", highlight=False)
    return train, val, splits.classes, skipped


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["Backbone", "extract_features", "feature_cache_dir", "load_backbone", "probe", "split_features"]
