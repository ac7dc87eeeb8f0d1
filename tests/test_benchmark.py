"""``imgrec benchmark``: one row per backend, eager fp32 the reference of speed and agreement."""

from __future__ import annotations

import json

import pytest

from imgrec.cli import main
from imgrec.inference.benchmark import BackendResult, benchmark, best_backend


def test_every_backend_gets_latency_throughput_and_agreement(run_dir):
    results = benchmark(run_dir, backends=("eager", "channels_last", "onnx"), batch=4, iterations=4, seconds=0.3, rounds=2, calibration_images=8)
    assert [r.backend for r in results] == ["eager", "channels_last", "onnx"]
    for r in results:
        assert 0 < r.p50_ms <= r.p99_ms and r.images_per_s > 0
        assert r.top1_agreement == 100.0  # fp32 backends decide as eager does on the 36 val images
    assert results[0].speedup == 1.0
    assert results[2].speedup == pytest.approx(results[2].images_per_s / results[0].images_per_s)


def test_best_backend_is_the_fastest_that_agrees():
    rows = [BackendResult("eager", images_per_s=10, top1_agreement=100), BackendResult("int8", images_per_s=50, top1_agreement=97.0),
            BackendResult("bf16", images_per_s=30, top1_agreement=99.5), BackendResult("broken", note="unavailable")]  # fmt: skip
    assert best_backend(rows).backend == "bf16"
    assert best_backend(rows, min_agreement=95).backend == "int8"


def test_benchmark_command_prints_the_table_and_refuses_unknown_backends(run_dir, tmp_path, capsys):
    figures = tmp_path / "bench.json"
    args = ["benchmark", str(run_dir), "--backends", "eager,bf16", "--batch", "4", "--iterations", "2", "--seconds", "0.2", "--json", str(figures)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "best with >= 99% agreement" in out
    assert [row["backend"] for row in json.loads(figures.read_text())] == ["eager", "bf16"]
    assert main(["benchmark", str(run_dir), "--backends", "eager,tensorrt"]) == 2
    assert "unknown backend(s) tensorrt" in capsys.readouterr().err
