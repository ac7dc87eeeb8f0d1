"""The commands end to end: `imgrec benchmark` makes `predict` pick the fastest backend; `imgrec serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from imgrec.cli import main
from imgrec.inference.predict import load


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run[0]


def val_images(run: Path) -> list[Path]:
    import yaml

    data = Path(yaml.safe_load((run / "config.yaml").read_text())["data"])
    return sorted((data / "val").rglob("*.jpg"))


def test_predict_runs_the_backend_the_benchmark_found_fastest(run_dir, capsys):
    image = val_images(run_dir)[0]
    assert main(["predict", str(run_dir), str(image), "--format", "json"]) == 0
    before = capsys.readouterr()
    assert "backend: " in before.err and "imgrec benchmark" in before.err  # no benchmark yet: PyTorch, and a hint
    files_before = {p.name for p in run_dir.iterdir()}
    args = ["benchmark", str(run_dir), "--backends", "eager,onnx,onnx-int8", "--batch", "4", "--iterations", "4", "--seconds", "0.3"]
    assert main(args) == 0
    capsys.readouterr()
    added = {p.name for p in run_dir.iterdir()} - files_before  # the ONNX files and the table, no intermediate file
    assert added == {"benchmark.json", "model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json"}
    record = json.loads((run_dir / "benchmark.json").read_text())
    rates = {r["backend"]: r["images_per_s"] for r in record["results"] if r["top1_agreement"] >= 99}
    fastest = max(rates, key=rates.get)
    assert main(["predict", str(run_dir), str(image), "--format", "json"]) == 0
    after = capsys.readouterr()
    assert f"backend: {fastest} (fastest in benchmark.json" in after.err
    top = lambda out: json.loads(out)[0]["top"]  # noqa: E731
    for a, b in zip(top(before.out), top(after.out)):
        assert a["class"] == b["class"] and a["prob"] == pytest.approx(b["prob"], abs=1e-3)  # bf16 before, fp32 after
    assert load(run_dir, device="cpu").backend == fastest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_and_stops_cleanly_on_sigterm(run_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "imgrec", "serve", str(run_dir), "--port", str(port), "--backend", "eager", "--name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready in 120 s"
            time.sleep(0.1)
        image = val_images(run_dir)[0]
        answer = httpx.post(url + "/predict", files={"file": image.open("rb")}, timeout=30).json()
        expected = load(run_dir, device="cpu", backend="eager").predict(image)[0]
        assert [t["class"] for t in answer["top"]] == expected.labels and answer["backend"] == "eager"
        assert [t["prob"] for t in answer["top"]] == pytest.approx(expected.probs, abs=1e-5)
        assert httpx.get(url + "/v2/models/tiny/ready").status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then ends by the signal it caught (as systemd and Kubernetes expect)
    assert server.returncode == -signal.SIGTERM, out
    assert "Application shutdown complete" in out and "backend eager (asked for)" in out and "Traceback" not in out
