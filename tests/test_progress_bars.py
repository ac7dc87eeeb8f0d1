"""Long work shows a progress bar on a terminal and nothing when its output is piped.

A terminal is a rich ``Console(force_terminal=True)`` writing into a buffer: the bar's line (its
description and done/total count) must appear there. Piped is the real command with its output
captured by a pipe: no bar, and the results as before.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from imgrec.progress import activity, shows, track


def terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120, color_system=None), buffer


def test_track_draws_on_a_terminal_and_passes_items_through() -> None:
    console, buffer = terminal()
    assert shows(console) and not shows(None) and not shows(Console(file=io.StringIO()))
    assert list(track(range(7), "counting", console=console, unit="things")) == list(range(7))
    drawn = buffer.getvalue()
    assert "counting" in drawn and "/7" in drawn and "things" in drawn
    piped = io.StringIO()
    assert list(track(iter("abc"), "counting", console=Console(file=piped))) == ["a", "b", "c"]
    assert list(track(iter("abc"), "counting", console=None)) == ["a", "b", "c"]
    assert piped.getvalue() == ""


def test_track_of_a_stream_without_length_and_activity() -> None:
    console, buffer = terminal()
    assert list(track((i for i in range(3)), "streaming", console=console)) == [0, 1, 2]
    with activity("calibrating", console=console) as task:
        assert task is not None
    with activity("calibrating", console=None) as task:
        assert task is None
    assert "streaming" in buffer.getvalue() and "calibrating" in buffer.getvalue()


def test_verify_shows_a_bar_on_a_terminal_only(tiny_shapes: Path) -> None:
    from imgrec.data.verify import verify_folder

    console, buffer = terminal()
    report = verify_folder(tiny_shapes, workers=1, console=console)
    assert len(report.files) == 36 and not report.bad
    assert f"verifying {tiny_shapes}" in buffer.getvalue() and "/36" in buffer.getvalue()
    piped = subprocess.run([sys.executable, "-m", "imgrec", "verify", str(tiny_shapes), "--workers", "1"], capture_output=True, text=True, timeout=120, check=False)
    assert piped.returncode == 0, piped.stderr
    assert "36 files checked, 0 bad" in piped.stdout
    assert "verifying" not in piped.stdout + piped.stderr and "\x1b[" not in piped.stdout


def test_shards_evaluate_predict_and_probe_show_bars(tiny_shapes: Path, run_dir: Path, tmp_path: Path) -> None:
    from imgrec.data.shard_writer import write_shards
    from imgrec.engine.evaluate import evaluate
    from imgrec.engine.probe import probe
    from imgrec.inference.predict import load

    console, buffer = terminal()
    info = write_shards(tiny_shapes / "train", tmp_path / "shards", workers=1, console=console)
    assert info.samples == 24
    assert "writing shards of" in buffer.getvalue() and "/24" in buffer.getvalue()

    console, buffer = terminal()
    metrics = evaluate(run_dir, tiny_shapes / "val", device="cpu", workers=0, batch_size=4, console=console)
    assert sum(row["n"] for row in metrics["per_class"]) == 12
    assert f"evaluating {run_dir}" in buffer.getvalue() and "/3" in buffer.getvalue()  # 12 images in batches of 4

    console, buffer = terminal()
    predictions = load(run_dir, device="cpu", backend="eager").predict(tiny_shapes / "val", batch_size=5, console=console)
    assert len(predictions) == 12 and all(p.error is None for p in predictions)
    assert "predicting 12 images" in buffer.getvalue() and "/3" in buffer.getvalue()

    console, buffer = terminal()
    probe(str(run_dir), str(tiny_shapes), method="knn", device="cpu", workers=0, batch_size=8, cache=False, console=console, data_config={"img_size": 32})
    assert "train features" in buffer.getvalue() and "val features" in buffer.getvalue()


def test_export_and_benchmark_show_bars(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from imgrec.inference.benchmark import benchmark
    from imgrec.inference.export import export

    console, buffer = terminal()
    report = export(run_dir, "onnx", out=tmp_path / "m.onnx", max_images=8, console=console)
    assert report.images == 8 and report.top1_agreement == 100.0
    drawn = buffer.getvalue()
    assert "reading images" in drawn and "/8" in drawn and "exporting to onnx" in drawn and "checking m.onnx" in drawn

    console, buffer = terminal()
    results = benchmark(run_dir, backends=("eager", "onnx"), batch=4, iterations=2, seconds=0.05, max_images=8, rounds=2, record=False, console=console)
    assert [r.backend for r in results] == ["eager", "onnx"] and all(r.images_per_s for r in results)
    drawn = buffer.getvalue()
    assert "preparing backends" in drawn and "/2" in drawn and "timing 2 backends in 2 rounds" in drawn and "/4" in drawn
