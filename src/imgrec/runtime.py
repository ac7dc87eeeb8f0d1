"""Inference backends: one trained model behind one call, from a normalised float batch to logits.

``make_backend(name, ...)`` gives a function from a float32 NCHW batch (resized, cropped and
normalised as the model directory says) to float32 logits on the CPU. The backends:

- ``eager``: PyTorch fp32, contiguous memory (the reference the others are judged against);
- ``channels_last``: fp32, NHWC memory (oneDNN's preferred layout on CPUs, cuDNN's on GPUs);
- ``bf16``: bf16 autocast + channels_last; ``fp16``: the same in fp16 (CUDA only);
- ``compile``: ``torch.compile`` of the channels_last model, in bf16 where the hardware has it;
- ``onnx`` / ``onnx-int8``: onnxruntime on RUN/model.onnx or RUN/model.int8.onnx (CPU).

``imgrec benchmark RUN`` times them all and records the table in RUN/benchmark.json, with the
SHA-256 of the weights it measured; ``choose_backend`` then gives ``predict`` and ``serve`` the
fastest backend with at least 99% top-1 agreement, as long as the weights are still those and
the device is the CPU it was measured on. Without a benchmark it is PyTorch with channels_last
and the precision the hardware does best (bf16 where native, as training uses).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imgrec.engine.hardware import autocast, resolve_precision

BACKENDS = ("eager", "channels_last", "bf16", "compile", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
BENCHMARK_NAME = "benchmark.json"
MIN_AGREEMENT = 99.0  # percent top-1 agreement with eager fp32 a backend needs to be chosen by default
# The PyTorch backends as (precision, channels_last); compile adds torch.compile to channels_last.
TORCH_BACKENDS = {"eager": ("fp32", False), "channels_last": ("fp32", True), "bf16": ("bf16", True), "fp16": ("fp16", True)}

Forward = Callable[[torch.Tensor], torch.Tensor]


def torch_forward(model: torch.nn.Module, device: torch.device, precision: str, *, channels_last: bool = True, compiled: bool = False) -> Forward:
    """``model`` (moved to ``device`` and, if asked, to channels_last memory in place) as a Forward."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=memory_format)
    call = torch.compile(model) if compiled else model

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            return call(x).float().cpu()

    return forward


def onnx_forward(path: str | os.PathLike, threads: int | None = None) -> Forward:
    """An onnxruntime session on the CPU as a Forward."""
    from imgrec.export import onnx_session

    session = onnx_session(path, threads)
    return lambda x: torch.from_numpy(session.run(None, {"input": x.float().cpu().contiguous().numpy()})[0])


def make_backend(
    name: str, model: torch.nn.Module, device: torch.device, *, precision: str = "auto", onnx_path: str | os.PathLike | None = None, threads: int | None = None
) -> Forward:
    """The Forward of backend ``name``; ``model`` is used (moved, re-laid out) as it is: pass a copy to keep yours.

    ``onnx_path``: the ONNX file of an ``onnx``/``onnx-int8`` backend. ``precision`` applies to ``compile`` only
    (the other names fix theirs).
    """
    if name in TORCH_BACKENDS:
        fixed, channels_last = TORCH_BACKENDS[name]
        return torch_forward(model, device, resolve_precision(fixed, device), channels_last=channels_last)
    if name == "compile":
        return torch_forward(model, device, resolve_precision(precision, device), compiled=True)
    if name in ONNX_FILES:
        if device.type != "cpu":
            raise ValueError(f"backend {name} runs onnxruntime on the CPU; use --device cpu, or a PyTorch backend on {device}")
        if onnx_path is None or not Path(onnx_path).is_file():
            raise FileNotFoundError(f"backend {name} needs {onnx_path or ONNX_FILES[name]}: make it with `imgrec export` or `imgrec benchmark`")
        return onnx_forward(onnx_path, threads)
    raise ValueError(f"unknown backend {name!r}: choose from auto, {', '.join(BACKENDS)}")


def default_backend(precision: str, device: torch.device) -> str:
    """The PyTorch backend of a precision: channels_last at fp32, else bf16 or fp16 (``auto``: the hardware's best)."""
    resolved = resolve_precision(precision, device)
    return "channels_last" if resolved == "fp32" else resolved


def weights_digest(run: str | os.PathLike) -> str:
    """SHA-256 of RUN/model.safetensors: a benchmark applies to these weights only."""
    from imgrec.checkpoint import WEIGHTS_NAME

    return file_digest(Path(run) / WEIGHTS_NAME)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_benchmark(run: str | os.PathLike, results: list[Any], batch: int) -> Path:
    """Write RUN/benchmark.json: the table, the machine, and the weights it was measured on."""
    from imgrec.utils import write_json

    path = Path(run) / BENCHMARK_NAME
    rows = []
    for r in results:
        row = dict(r.__dict__)
        if row["backend"] in ONNX_FILES and (Path(run) / ONNX_FILES[row["backend"]]).is_file():  # the very file measured
            row["file_sha256"] = file_digest(Path(run) / ONNX_FILES[row["backend"]])
        rows.append(row)
    write_json(
        path,
        {
            "weights_sha256": weights_digest(run), "device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "batch": batch, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows,
        },
    )  # fmt: skip
    return path


def choose_backend(run: str | os.PathLike, device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """(backend, why): the fastest one RUN/benchmark.json recorded with >= 99% agreement, else PyTorch's default.

    A precision other than ``auto`` asks for PyTorch at that precision, whatever was benchmarked.
    """
    default = default_backend(precision, device)
    if precision != "auto":
        return default, f"--precision {precision}"
    path = Path(run) / BENCHMARK_NAME
    if not path.is_file():
        return default, f"no {BENCHMARK_NAME} (run `imgrec benchmark {run}` to pick the fastest backend)"
    if device.type != "cpu":
        return default, f"{BENCHMARK_NAME} was measured on the CPU, this runs on {device}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        results = [r for r in record["results"] if isinstance(r, dict)]
        recorded_digest, recorded_cpu = record["weights_sha256"], record.get("cpu")
        usable = [
            r for r in results
            if r.get("backend") in BACKENDS and isinstance(r.get("images_per_s"), (int, float)) and r["images_per_s"] > 0
            and isinstance(r.get("top1_agreement"), (int, float)) and r["top1_agreement"] >= MIN_AGREEMENT
        ]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return default, f"{path} is unreadable ({exc}): run `imgrec benchmark {run}` again"
    if recorded_digest != weights_digest(run):
        return default, f"the weights changed since {BENCHMARK_NAME} was written: run `imgrec benchmark {run}` again"
    if recorded_cpu is not None and recorded_cpu != cpu_name():
        return default, f"{BENCHMARK_NAME} was measured on another CPU ({recorded_cpu}): run `imgrec benchmark {run}` here"
    usable = [r for r in usable if r["backend"] not in ONNX_FILES or onnx_file_matches(Path(run) / ONNX_FILES[r["backend"]], r.get("file_sha256"))]
    if not usable:
        return default, f"no backend in {BENCHMARK_NAME} has {MIN_AGREEMENT:.0f}% agreement and its files as measured"
    best = max(usable, key=lambda r: r["images_per_s"])
    return best["backend"], f"fastest in {BENCHMARK_NAME}: {best['images_per_s']:.1f} img/s, {best['top1_agreement']:.2f}% top-1 agreement"


def onnx_file_matches(path: Path, recorded: str | None) -> bool:
    """Whether ``path`` is the ONNX file the benchmark measured (a later export may have replaced it)."""
    return path.is_file() and recorded is not None and file_digest(path) == recorded


__all__ = ["BACKENDS", "BENCHMARK_NAME", "ONNX_FILES", "choose_backend", "default_backend", "make_backend", "record_benchmark", "torch_forward", "weights_digest"]
