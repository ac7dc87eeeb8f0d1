"""Similarity search over a folder of images with a trained model's features (``imgrec index``,
``imgrec search``, the server's ``/search``).

An index is a folder: ``embeddings.safetensors`` (the L2-normalised pooled features of every
readable image, float16, one row per file) and ``index.json`` (the files in row order, relative
to the folder indexed, with the run, architecture and feature size that made them). Search is
exact: the query's cosine similarity to every row, by matrix product over chunks of rows, so a
million 512-d rows (1 GB in float16) are searched without a second copy in memory.

The features are the network's pooled features before its classifier (timm's
``forward_head(..., pre_logits=True)``; for another module, the input of its last ``Linear``).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from imgrec.progress import track

INDEX_FILE, EMBEDDINGS_FILE = "index.json", "embeddings.safetensors"
CHUNK_ROWS = 65_536  # rows multiplied at once: 65,536 x 512 float32 = 128 MB


def pooled_features(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The pooled features of a normalised batch, before the classifier (float32 [B, D])."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(inputs), pre_logits=True).float()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier and no forward_head: no pooled features to index")
    captured: dict[str, torch.Tensor] = {}
    handle = linears[-1].register_forward_hook(lambda _m, args, _out: captured.__setitem__("features", args[0]))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured["features"].flatten(1).float()


@torch.inference_mode()
def embed(classifier: Any, images: list[torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
    """L2-normalised pooled features (float32 [B, D], CPU) of uint8 model-input images, by
    ``model`` (default the classifier's PyTorch model)."""
    model = (model if model is not None else classifier.model).to(classifier.device).eval()
    inputs = classifier.normalize(torch.stack(images).to(classifier.device)).float()
    return F.normalize(pooled_features(model, inputs), dim=1).cpu()


def embed_files(classifier: Any, paths: list[Path], batch_size: int = 64, console: Console | None = None) -> tuple[torch.Tensor, list[Path], list[dict[str, str]]]:
    """(features of the readable files, those files, [{path, reason}] of the others)."""
    from imgrec.data.decode import BadImageError, load_sample

    rows, kept, skipped = [], [], []
    for start in track(range(0, len(paths), batch_size), f"embedding {len(paths)} images", console=console, unit="batches"):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(load_sample(path, classifier.transform))
                kept.append(path)
            except BadImageError as exc:
                skipped.append({"path": str(path), "reason": exc.reason})
        if batch:
            rows.append(embed(classifier, batch))
    if not rows:
        raise ValueError("no readable image to index: every file was skipped")
    return torch.cat(rows), kept, skipped


def build_index(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None, *, device: str = "auto",
                batch_size: int = 64, console: Console | None = None) -> dict[str, Any]:  # fmt: skip
    """Index every image under ``data`` (recursively) with the model of ``run``; writes ``out``
    (default RUN/index) and returns what index.json holds, with the files skipped."""
    from safetensors.torch import save_file

    from imgrec.data.folder import iter_image_files
    from imgrec.inference.predict import load

    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"--data {data} is not a folder: pass the folder of images to index")
    files = iter_image_files(root)
    if not files:
        raise ValueError(f"{data} holds no image files")
    classifier = load(run, device=device, precision="fp32", backend=None)
    features, kept, skipped = embed_files(classifier, files, batch_size, console)
    out = Path(out) if out is not None else Path(run) / "index"
    out.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": features.half().contiguous()}, str(out / EMBEDDINGS_FILE))
    info = {
        "run": str(Path(run).resolve()), "architecture": classifier.card.architecture, "weights_sha256": weights_digest(run), "root": str(root.resolve()),
        "count": len(kept), "dim": int(features.shape[1]), "files": [p.relative_to(root).as_posix() for p in kept],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    (out / INDEX_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {**info, "skipped": skipped, "index": str(out)}


def weights_digest(run: str | os.PathLike) -> str:
    """The SHA-256 of a run's model.safetensors: which weights made an index's features."""
    from imgrec.card import MODEL_WEIGHTS
    from imgrec.utils import file_sha256

    return file_sha256(Path(run) / MODEL_WEIGHTS)


class Index:
    """A written index, loaded for searching."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file() or not (folder / EMBEDDINGS_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not an index: no {INDEX_FILE} and {EMBEDDINGS_FILE}; make one with `imgrec index RUN --data DIR`")
        self.folder = folder
        self.info = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        self.root = Path(self.info["root"])
        self.files: list[str] = self.info["files"]
        self.embeddings = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"]
        if len(self.files) != len(self.embeddings):
            raise ValueError(f"{folder}: {len(self.files)} files but {len(self.embeddings)} embeddings: the index is damaged; build it again")

    def check(self, classifier: Any) -> None:
        """Refuse a model whose features are not the index's: another architecture, or other weights
        (the weights' SHA-256, where the classifier was loaded from a run directory)."""
        if classifier.card.architecture != self.info["architecture"]:
            raise ValueError(f"{self.folder} was built with {self.info['architecture']}, not {classifier.card.architecture}: search with the run that built it")
        source = getattr(classifier, "source", None)
        if source is not None and self.info.get("weights_sha256") not in (None, weights_digest(source)):
            raise ValueError(f"{self.folder} was built with other weights than {source}'s ({self.info['run']}): search with that run, or index again with this one")

    def nearest(self, queries: torch.Tensor, k: int = 10) -> list[list[tuple[str, float]]]:
        """For each normalised query row, the ``k`` most similar files and their cosine similarity, best first."""
        k = min(k, len(self.files))
        best_scores = torch.full((len(queries), k), -2.0)
        best_rows = torch.zeros((len(queries), k), dtype=torch.long)
        for start in range(0, len(self.embeddings), CHUNK_ROWS):
            scores = queries.float() @ self.embeddings[start : start + CHUNK_ROWS].float().T
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_rows = torch.cat([best_rows, torch.arange(start, start + scores.shape[1]).expand(len(queries), -1)], dim=1)
            best_scores, order = merged_scores.topk(k, dim=1)
            best_rows = merged_rows.gather(1, order)
        return [[(self.files[r], float(s)) for r, s in zip(rows.tolist(), scores.tolist())] for rows, scores in zip(best_rows, best_scores)]


def search(run: str | os.PathLike, images: list[str | os.PathLike], *, index: str | os.PathLike | None = None, k: int = 10,
           device: str = "auto") -> list[dict[str, Any]]:  # fmt: skip
    """The ``k`` nearest indexed images of each query image: [{query, neighbours: [{file, path, similarity}]}]."""
    from imgrec.data.decode import BadImageError, load_sample
    from imgrec.inference.predict import load

    found = Index(index if index is not None else Path(run) / "index")
    classifier = load(run, device=device, precision="fp32", backend=None)
    found.check(classifier)
    results = []
    for image in images:
        try:
            query = embed(classifier, [load_sample(image, classifier.transform)])
        except BadImageError as exc:
            results.append({"query": str(image), "error": exc.reason})
            continue
        neighbours = found.nearest(query, k)[0]
        results.append({"query": str(image), "neighbours": [{"file": f, "path": str(found.root / f), "similarity": s} for f, s in neighbours]})
    return results


__all__ = ["Index", "build_index", "embed", "embed_files", "pooled_features", "search"]
