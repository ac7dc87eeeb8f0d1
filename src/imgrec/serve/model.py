"""One model a server answers for: its classifier, its dynamic batcher, what it has in flight, and
how a request's images become its input (``imgrec serve RUN1 RUN2 ...`` holds several)."""

from __future__ import annotations

import copy
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgrec.config import ServeConfig
from imgrec.data.decode import BadImageError, EncodedImage, TooManyPixelsError, load_sample
from imgrec.inference.predict import Classifier
from imgrec.inference.search import Index
from imgrec.serve.batcher import DynamicBatcher
from imgrec.serve.metrics import Metrics
from imgrec.serve.protocol import InferRequest, RequestError, bad

log = logging.getLogger("imgrec.serve")


class ServedModel:
    """A classifier served under ``name`` (version "1"), with a batcher of its own; ``run`` is the
    model directory it was loaded from (what a reload reads), ``index`` its search index, if any."""

    def __init__(self, name: str, classifier: Classifier, config: ServeConfig, metrics: Metrics, run: str | Path | None = None, index: Index | None = None):
        if index is not None:
            index.check(classifier)
        self.name, self.classifier, self.config, self.metrics, self.run, self.index = name, classifier, config, metrics, run, index
        self.size = classifier.card.img_size
        self.batcher = DynamicBatcher(
            classifier.forward, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000, on_batch=metrics.observe_batch, pad=config.pad_batches
        )
        self.in_flight = 0  # images between decoding and their answer
        self.explaining = threading.Lock()  # /explain and /search: one at a time, on a copy of the model of their own
        self._analysis_model: torch.nn.Module | None = None

    async def start(self) -> None:
        await self.batcher.start()
        for batch in self.batcher.sizes or sorted({1, self.config.max_batch}):  # first calls allocate (and compile has the shapes to build): not a client's wait
            await self.batcher(torch.zeros(batch, 3, self.size, self.size, device=self.classifier.device))
        log.info("serving %s as %r with backend %s", self.classifier.card.architecture, self.name, self.classifier.backend)

    async def stop(self) -> None:
        await self.batcher.stop()

    def analysis_model(self) -> torch.nn.Module:
        """A copy of the PyTorch model for /explain and /search (hold ``explaining``): their hooks and
        backward passes never touch the module the batcher runs."""
        if self._analysis_model is None:
            self._analysis_model = copy.deepcopy(self.classifier.model).float().eval()
        return self._analysis_model

    def check_resized_pixels(self, name: str, height: int, width: int) -> None:
        """Refuse an image whose eval resize (shorter side to img_size / crop_pct) would exceed the pixel limit:
        a 1 x 1,000,000 strip has few pixels but would be resized to hundreds of millions."""
        short, long = sorted((max(1, height), max(1, width)))
        side = self.size / float(self.classifier.card.data_config.crop_pct)
        resized = side * side * long / short
        if resized > self.config.max_pixels:
            raise bad(
                "too_many_pixels",
                f"{name}: {width}x{height} would be resized to {resized:,.0f} pixels, over this server's limit of "
                f"{self.config.max_pixels:,}: crop it nearer to square",
                413,
            )

    def decode(self, name: str, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
        except Exception:  # not an image: load_sample says why
            pass
        else:
            self.check_resized_pixels(name, height, width)
        try:
            return load_sample(EncodedImage(name, data), self.classifier.transform, self.config.max_pixels)
        except TooManyPixelsError as exc:
            raise bad("too_many_pixels", f"{name}: {exc.reason} (this server's limit: {self.config.max_pixels:,} pixels)", 413) from None
        except BadImageError as exc:
            raise bad("bad_image", f"{name}: {exc.reason}") from None

    def prepare(self, request: InferRequest) -> torch.Tensor:
        """The normalised float batch of a parsed request (runs on a worker thread)."""
        device = self.classifier.device
        if request.datatype == "FP32":
            return torch.from_numpy(request.array.copy()).to(device)
        if request.datatype == "BYTES":
            names = request.names or [f"input[{i}]" for i in range(len(request.images))]
            images = [self.decode(name, data) for name, data in zip(names, request.images)]
        else:
            pixels = request.array.shape[2] * request.array.shape[3]
            if pixels > self.config.max_pixels:
                raise bad("too_many_pixels", f"UINT8 images of {pixels:,} pixels, over this server's limit of {self.config.max_pixels:,}", 413)
            self.check_resized_pixels("input", *request.array.shape[2:])
            pixels_in = torch.from_numpy(np.array(request.array))  # a writable copy: the request's buffer is read-only
            images = [self.classifier._prepare(f"input[{i}]", image) for i, image in enumerate(pixels_in)]
            failed = next((p for p in images if not isinstance(p, torch.Tensor)), None)
            if failed is not None:
                raise bad("bad_image", f"{failed.source}: {failed.error}")
        with torch.inference_mode():  # uint8 travels to the GPU, a quarter of float's bytes
            return self.classifier.normalize(torch.stack(images).to(device)).float()

    async def logits(self, request: InferRequest) -> torch.Tensor:
        if self.in_flight + request.count > self.config.max_queue:
            raise RequestError(503, "overloaded", f"{self.in_flight} images are being classified, the most this server queues is "
                               f"{self.config.max_queue} (--max-queue): retry in a moment")  # fmt: skip
        self.in_flight += request.count
        try:
            inputs = await run_in_threadpool(self.prepare, request)
            self.metrics.images.inc(len(inputs))
            return await self.batcher(inputs)
        finally:
            self.in_flight -= request.count

    def metadata(self) -> dict[str, Any]:
        """The model's v2 metadata: inputs, outputs and what the server knows of its preprocessing (HTTP and gRPC)."""
        data, size, classes = self.classifier.card.data_config, self.size, len(self.classifier.classes)
        return {
            "name": self.name, "versions": ["1"], "platform": f"imgrec/{self.classifier.backend}",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, -1, -1]},
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}, {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "classes", "datatype": "BYTES", "shape": [-1, -1]}, {"name": "names", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            ],
            "parameters": {
                "architecture": self.classifier.card.architecture, "classes": self.classifier.classes, "img_size": size, "crop_pct": data.crop_pct,
                "mean": list(data.mean), "std": list(data.std), "interpolation": data.interpolation, "top_k": 5,
                "max_batch": self.config.max_batch, "max_images": self.config.max_images, "max_pixels": self.config.max_pixels,
                "max_body_bytes": self.config.max_body_bytes, "one_input": "send exactly one of the inputs; its datatype says which",
            },
        }  # fmt: skip

    def output_tensors(self, logits: torch.Tensor, request: InferRequest) -> dict[str, tuple[str, Any, list[int]]]:
        classes, n = self.classifier.classes, len(logits)
        rows = self.classifier.rank(logits, request.top_k, [""] * n)
        k = len(rows[0].labels)
        tensors: dict[str, tuple[str, Any, list[int]]] = {
            "probabilities": ("FP32", np.array([r.probs for r in rows], dtype=np.float32), [n, k]),
            "indices": ("INT64", np.array([r.indices for r in rows], dtype=np.int64), [n, k]),
            "classes": ("BYTES", [c.encode() for r in rows for c in r.labels], [n, k]),
            "names": ("BYTES", [c.encode() for r in rows for c in (r.names or r.labels)], [n, k]),
            "logits": ("FP32", logits.numpy().astype(np.float32), [n, len(classes)]),
        }
        for output in request.outputs:  # Triton's classification extension: "value:index:label" strings
            count = (output.get("parameters") or {}).get("classification")
            if count:
                source = logits if output["name"] == "logits" else self.classifier.probabilities(logits)
                top_values, top_indices = source.topk(min(count, len(classes)), dim=1)
                strings = [f"{v:f}:{i}:{classes[i]}".encode() for v, i in zip(top_values.flatten().tolist(), top_indices.flatten().tolist())]
                tensors[output["name"]] = ("BYTES", strings, [n, top_values.shape[1]])
        return tensors


__all__ = ["ServedModel"]
