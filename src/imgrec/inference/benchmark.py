"""``imgrec benchmark RUN``: latency and throughput of every inference backend, with top-1 agreement.

Backends (those that apply on the machine): ``eager`` (fp32, the baseline), ``channels_last``,
``bf16`` (autocast + channels_last), ``compile`` (torch.compile of the bf16 channels_last model,
fp32 on CPUs without native bf16), ``onnx`` (onnxruntime fp32), ``onnx-int8`` (onnxruntime
static int8, calibrated on the run's images), ``openvino`` and ``openvino-int8`` (OpenVINO fp32,
NNCF's accuracy-controlled int8). Each gets latency at batch 1 (p50, p99 over
``iterations`` calls) and throughput at the larger batch (images/s, the median of ``rounds``
rounds in which the backends take turns), and its top-1 agreement with eager fp32 on real
images (the run's val split or ``images``). Inputs are
the preprocessed float tensors, so the figures are the model's, not the JPEG decoder's. The
table goes to RUN/benchmark.json and the ONNX files stay in RUN: ``imgrec predict`` and
``imgrec serve`` then run the fastest backend that agrees (``imgrec.inference.choice.choose_backend``).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from imgrec.card import ModelCard
from imgrec.hardware import flush_denormals
from imgrec.inference.backends import BACKENDS, backend_class, get_backend
from imgrec.inference.choice import MIN_AGREEMENT, record_benchmark
from imgrec.inference.export import parity_files, preprocess, top1_agreement, write_sidecar
from imgrec.models.directory import load_model_dir
from imgrec.progress import track


@dataclass
class BackendResult:
    backend: str
    p50_ms: float | None = None  # batch-1 latency
    p99_ms: float | None = None
    images_per_s: float | None = None  # at the large batch
    top1_agreement: float | None = None  # percent, against eager fp32
    speedup: float | None = None  # throughput over eager fp32's
    note: str = ""


def benchmark_backend(
    name: str, model: torch.nn.Module, example: torch.Tensor, calibration: torch.Tensor, card: ModelCard, run: Path, written: set[str], threads: int | None = None
) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from a float32 NCHW batch to logits (numpy) for backend ``name``, on its own copy
    of ``model`` (memory formats and compilation must not leak from one backend to another). The
    file a backend runs from is exported to RUN (model.onnx, model.int8.onnx, as ``imgrec export``
    names them) for predict and serve; ``written`` holds the backends whose files this benchmark made."""
    backend = get_backend(name)
    model = copy.deepcopy(model)
    path = None
    if backend.file is not None:
        path = run / backend.file
        fp32 = run / backend_class("onnx").file if "onnx" in written else None  # int8 quantises the fp32 export this benchmark wrote
        backend.export(model, example, card, path, calibration=calibration, fp32=fp32)
        write_sidecar(path, card)
        written.add(name)
    forward = backend.load(model, torch.device("cpu"), path=path, threads=threads)
    return lambda x: forward(x).numpy()


def cpu_backends() -> tuple[str, ...]:
    """The backends that run on the CPU, which the benchmark measures by default."""
    return tuple(name for name in BACKENDS if "cpu" in (backend_class(name).devices or ("cpu",)))


def latencies(run_fn: Callable[[torch.Tensor], np.ndarray], one: torch.Tensor, iterations: int) -> list[float]:
    """Milliseconds of ``iterations`` batch-1 calls."""
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        run_fn(one)
        times.append(1000 * (time.perf_counter() - started))
    return times


def throughput(run_fn: Callable[[torch.Tensor], np.ndarray], batch: torch.Tensor, seconds: float) -> float:
    """images/s over at least two batches and about ``seconds``."""
    rounds, started = 0, time.perf_counter()
    while rounds < 2 or time.perf_counter() - started < seconds:
        run_fn(batch)
        rounds += 1
    return rounds * batch.shape[0] / (time.perf_counter() - started)


def benchmark(
    run: str | os.PathLike,
    *,
    backends: tuple[str, ...] | None = None,
    batch: int = 32,
    iterations: int = 50,
    seconds: float = 10.0,
    images: str | os.PathLike | None = None,
    max_images: int = 256,
    calibration_images: int = 300,
    threads: int | None = None,
    rounds: int = 3,
    record: bool = True,
    console: Console | None = None,
) -> list[BackendResult]:
    """One ``BackendResult`` per backend (default: every one that runs on the CPU), eager fp32 first
    (the others' reference); ``record`` writes them to RUN/benchmark.json, where predict and serve
    find the fastest backend. Progress (images read, backends prepared, timing rounds) shows on
    ``console`` where it is a terminal."""
    backends = cpu_backends() if backends is None else tuple(backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(BACKENDS)}")
    if threads:
        torch.set_num_threads(threads)
    model, card = load_model_dir(run)
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    flush_denormals(torch.device("cpu"))
    inputs = preprocess(card, parity_files(Path(run), images, max_images + (calibration_images if any(backend_class(b).calibrates for b in backends) else 0), seed=0), console=console)
    checked = inputs[:max_images]  # int8 calibrates on other images than those it is judged on, when there are enough
    calibration = inputs[max_images:] if len(inputs) > max_images else inputs[:calibration_images]
    generator = torch.Generator().manual_seed(0)
    one = torch.randn(1, 3, card.img_size, card.img_size, generator=generator)
    large = torch.randn(batch, 3, card.img_size, card.img_size, generator=generator)
    with torch.inference_mode():
        results, runners, reference = [], {}, None
        written: set[str] = set()
        for name in track(("eager", *[b for b in backends if b != "eager"]), "preparing backends", console=console, unit="backends"):
            try:
                run_fn = benchmark_backend(name, model, one.expand(2, -1, -1, -1).contiguous(), calibration, card, Path(run), written, threads)
                logits = np.concatenate([run_fn(chunk) for chunk in checked.split(batch)])  # also the warm-up (compile, allocators)
                run_fn(large)
                run_fn(one)  # torch.compile specialises on the batch size: both shapes compiled before timing
            except Exception as exc:  # a backend missing on this machine is reported, not fatal
                results.append(BackendResult(name, note=f"unavailable: {type(exc).__name__}: {exc}"[:200]))
                continue
            reference = logits if reference is None else reference
            runners[name] = run_fn
            results.append(BackendResult(name, top1_agreement=top1_agreement(logits, reference)))
        measure(results, runners, one, large, iterations=iterations, seconds=seconds, rounds=rounds, console=console)
    results = [r for r in results if r.backend in backends or r.backend == "eager"]
    if record:
        record_benchmark(run, results, batch)
    return results


def measure(
    results: list[BackendResult], runners: dict[str, Callable[[torch.Tensor], np.ndarray]], one: torch.Tensor, large: torch.Tensor,
    *, iterations: int, seconds: float, rounds: int, console: Console | None = None,
) -> None:  # fmt: skip
    """Fill in each result's latency (batch 1) and throughput (the large batch), timed in interleaved
    rounds whose medians count: a noisy machine slows every backend alike, not the last one measured."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    plan = [(name, run_fn) for _ in range(rounds) for name, run_fn in runners.items()]
    for name, run_fn in track(plan, f"timing {len(runners)} backends in {rounds} rounds", console=console, unit="runs"):
        times[name] += latencies(run_fn, one, max(1, iterations // rounds))
        rates[name].append(throughput(run_fn, large, seconds / rounds))
    for result in results:
        if result.backend in runners:
            ordered = sorted(times[result.backend])
            result.p50_ms = statistics.median(ordered)
            result.p99_ms = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
            result.images_per_s = statistics.median(rates[result.backend])
            result.speedup = result.images_per_s / statistics.median(rates["eager"])


def best_backend(results: list[BackendResult], min_agreement: float = MIN_AGREEMENT) -> BackendResult:
    """The fastest backend at the large batch whose top-1 agreement is at least ``min_agreement``."""
    good = [r for r in results if r.images_per_s is not None and (r.top1_agreement or 0) >= min_agreement]
    return max(good, key=lambda r: r.images_per_s)


__all__ = ["BackendResult", "benchmark", "best_backend", "cpu_backends", "latencies", "measure", "throughput"]
