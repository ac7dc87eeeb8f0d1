"""Which backend runs a model directory: the fastest ``imgrec benchmark`` measured, if it still applies.

``imgrec benchmark RUN`` times the backends and records the table in RUN/benchmark.json with the
SHA-256 of the weights it measured and of each file a backend ran from; ``choose_backend`` then
gives ``predict`` and ``serve`` the fastest backend with at least 99% top-1 agreement, as long as
the weights and files are still those and the device is the CPU it was measured on. Without a
benchmark it is PyTorch with channels_last and the precision the hardware does best (bf16 where
native, as training uses).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from imgrec.card import MODEL_WEIGHTS
from imgrec.hardware import resolve_precision
from imgrec.inference.backends import BACKENDS, backend_class
from imgrec.utils import file_sha256, write_json

BENCHMARK_NAME = "benchmark.json"
MIN_AGREEMENT = 99.0  # percent top-1 agreement with eager fp32 a backend needs to be chosen by default


def backend_file(name: str) -> str | None:
    """The file in the model directory the backend ``name`` runs from, if any."""
    return backend_class(name).file


def default_backend(precision: str, device: torch.device) -> str:
    """The PyTorch backend of a precision: channels_last at fp32, else bf16 or fp16 (``auto``: the hardware's best)."""
    resolved = resolve_precision(precision, device)
    return "channels_last" if resolved == "fp32" else resolved


def backend_file_digest(path: Path) -> str:
    """SHA-256 of the file a backend runs from; for an OpenVINO IR, of the .xml and its .bin
    (the weights are in the .bin: a re-export can leave the .xml as it was)."""
    digest = file_sha256(path)
    weights = path.with_suffix(".bin")
    if path.suffix == ".xml" and weights.is_file():
        digest = f"{digest}+{file_sha256(weights)}"
    return digest


def weights_digest(run: str | os.PathLike) -> str:
    """SHA-256 of RUN/model.safetensors: a benchmark applies to these weights only."""
    return file_sha256(Path(run) / MODEL_WEIGHTS)


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
    path = Path(run) / BENCHMARK_NAME
    rows = []
    for r in results:
        row = dict(r.__dict__)
        file = backend_file(row["backend"])
        if file and (Path(run) / file).is_file():  # the very file measured
            row["file_sha256"] = backend_file_digest(Path(run) / file)
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
    usable = [r for r in usable if not backend_file(r["backend"]) or file_matches(Path(run) / backend_file(r["backend"]), r.get("file_sha256"))]
    if not usable:
        return default, f"no backend in {BENCHMARK_NAME} has {MIN_AGREEMENT:.0f}% agreement and its files as measured"
    best = max(usable, key=lambda r: r["images_per_s"])
    return best["backend"], f"fastest in {BENCHMARK_NAME}: {best['images_per_s']:.1f} img/s, {best['top1_agreement']:.2f}% top-1 agreement"


def file_matches(path: Path, recorded: str | None) -> bool:
    """Whether ``path`` is the file the benchmark measured (a later export may have replaced it)."""
    return path.is_file() and recorded is not None and backend_file_digest(path) == recorded


__all__ = ["BENCHMARK_NAME", "MIN_AGREEMENT", "backend_file", "choose_backend", "cpu_name", "default_backend", "record_benchmark", "weights_digest"]
