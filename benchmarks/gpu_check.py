"""Every CUDA path of imgrec in one command, for the day a GPU is lent (under 8 minutes on one GPU).

Measures, on the first CUDA device:

1. environment: torch, CUDA, the device and its memory;
2. train, file pipeline: ResNet-50 at 224 px in bf16, images/s of `imgrec train` reading JPEGs
   with 4, 8 and 16 loader workers, and the fewest workers that give 90% of the best;
3. train, small-data fast path: the same with the decoded images cached on the device (--cache);
4. inference: ResNet-50 at 224, batch 64, images/s in eager fp32, bf16 autocast, torch.compile
   (bf16) and onnxruntime's CUDA provider where it is installed;
5. DDP: a 1-process NCCL run under torchrun with --sync-bn, which must finish;
6. exact resume: 3 epochs straight against a run stopped by SIGTERM in epoch 2 and resumed,
   --deterministic, weights bitwise equal;
7. serving: `imgrec serve` on CUDA, 256 concurrent /predict requests, images/s and p50/p95 latency.

Each step's failure is recorded in its row and the next step runs. Writes a markdown table to
stdout and every figure to --json (default gpu_check.json). On a machine without CUDA it says
so and exits 2; `--dry-run` prints what it would measure and writes the plan (the test suite
runs it, so the script stays runnable).

    python benchmarks/gpu_check.py [--json gpu_check.json] [--work /tmp/imgrec-gpu-check] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STEPS: dict[str, str] = {
    "environment": "torch and CUDA versions, the device, its memory",
    "train_files": "ResNet-50 224 px bf16 train images/s reading JPEGs, 4/8/16 loader workers; the fewest workers within 90% of the best",
    "train_cached": "the same on the small-data fast path (--cache: decoded once, augmented on the device)",
    "inference": "ResNet-50 224 px batch 64 images/s: eager fp32, bf16, torch.compile bf16, onnxruntime CUDA (if installed)",
    "ddp": "1-process NCCL DDP under torchrun with --sync-bn: finishes, images/s",
    "resume": "3 epochs straight vs a run stopped by SIGTERM in epoch 2 and resumed, --deterministic on CUDA: weights bitwise equal",
    "serve": "imgrec serve on CUDA: 256 concurrent /predict requests, images/s, p50 and p95 latency",
}
STEP_TIMEOUT_S = 150


def synth(root: Path, per_class: int, side: tuple[int, int]) -> Path:
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    if not (root / "train").is_dir():
        write_synth_dataset(root, SynthSpec(classes=10, train_per_class=per_class, val_per_class=8, min_side=side[0], max_side=side[1]), workers=os.cpu_count())
    return root


def train_rate(data: Path, out: Path, **options: Any) -> float:
    """images/s of the training steps of one short `imgrec train` epoch (its metrics row)."""
    from rich.console import Console

    from imgrec.engine.tasks.classify import train

    shutil.rmtree(out, ignore_errors=True)  # a rerun in the same --work measures afresh
    run = train(data=str(data), out=str(out), model="resnet50", epochs=1, precision="bf16", device="cuda", tensorboard=False,
                console=Console(quiet=True), data_config={"img_size": 224}, **options)  # fmt: skip
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(rows[-1]["images_per_s"])


def step_environment(work: Path) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "devices": torch.cuda.device_count()}  # fmt: skip


def step_train_files(work: Path) -> dict[str, Any]:
    data = synth(work / "photos", per_class=160, side=(256, 320))
    rates = {w: train_rate(data, work / f"files-w{w}", workers=w, batch_size=128, steps_per_epoch=10, cache=False) for w in (4, 8, 16)}
    best = max(rates.values())
    return {"images_per_s": rates, "workers_needed": min(w for w, r in rates.items() if r >= 0.9 * best)}


def step_train_cached(work: Path) -> dict[str, Any]:
    data = synth(work / "photos", per_class=160, side=(256, 320))
    return {"images_per_s": train_rate(data, work / "cached", workers=4, batch_size=128, steps_per_epoch=10, cache=True)}


def step_inference(work: Path) -> dict[str, Any]:
    import timm
    import torch

    model = timm.create_model("resnet50", num_classes=1000).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)

    def rate(call: Callable[[], Any], seconds: float = 5.0) -> float:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call()
            done += 1
        torch.cuda.synchronize()
        return round(64 * done / (time.perf_counter() - started), 1)

    results: dict[str, Any] = {}
    with torch.inference_mode():
        results["eager_fp32"] = rate(lambda: model(x))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results["bf16"] = rate(lambda: model(x))
            compiled = torch.compile(model)
            results["compile_bf16"] = rate(lambda: compiled(x))
    results["onnxruntime_cuda"] = onnx_cuda_rate(model, work, rate)
    return results


def onnx_cuda_rate(model: Any, work: Path, rate: Callable[..., float]) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    import numpy as np
    import torch

    path = work / "resnet50.onnx"
    torch.onnx.export(model.float().cpu().to(memory_format=torch.contiguous_format), torch.randn(1, 3, 224, 224), str(path),
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    batch = np.random.rand(64, 3, 224, 224).astype(np.float32)
    return rate(lambda: session.run(None, {"x": batch}))


def step_ddp(work: Path) -> dict[str, Any]:
    data = synth(work / "photos", per_class=160, side=(256, 320))
    out = work / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "imgrec", "train", "--data", str(data), "--out", str(out),
               "--model", "resnet50", "--epochs", "1", "--steps-per-epoch", "10", "--batch-size", "64", "--img-size", "224", "--sync-bn",
               "--device", "cuda", "--precision", "bf16", "--no-tensorboard"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"finished": True, "seconds": round(time.perf_counter() - started, 1), "images_per_s": rows[-1]["images_per_s"]}


def step_resume(work: Path) -> dict[str, Any]:
    """A run stopped by SIGTERM after its first epoch and resumed ends with the weights of one run straight through."""
    import signal

    from rich.console import Console
    from safetensors.torch import load_file

    from imgrec.engine.tasks.classify import train

    data = synth(work / "small", per_class=24, side=(64, 96))
    for folder in ("straight", "halves"):
        shutil.rmtree(work / folder, ignore_errors=True)
    flags = ["--data", str(data), "--model", "resnet18", "--device", "cuda", "--precision", "bf16", "--batch-size", "16", "--deterministic",
             "--no-tensorboard", "--img-size", "64", "--workers", "2", "--val-split", "0", "--epochs", "3"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "imgrec", "train", *flags, "--out", str(work / "straight")], check=True, capture_output=True, timeout=STEP_TIMEOUT_S)
    stopped = subprocess.Popen([sys.executable, "-m", "imgrec", "train", *flags, "--out", str(work / "halves")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = work / "halves" / "metrics.jsonl", time.monotonic() + STEP_TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text().strip()) and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)  # in epoch 2: the trainer writes a checkpoint of where it is and exits
    stopped.wait(timeout=STEP_TIMEOUT_S)
    train(resume=str(work / "halves"), console=Console(quiet=True))
    a, b = load_file(str(work / "straight" / "model.safetensors")), load_file(str(work / "halves" / "model.safetensors"))
    equal = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    return {"bitwise_equal": equal, "stopped_exit_code": stopped.returncode}


def step_serve(work: Path) -> dict[str, Any]:
    import httpx
    import uvicorn

    from imgrec.inference.predict import load
    from imgrec.serve import create_app

    data = synth(work / "small", per_class=24, side=(64, 96))
    run = work / "straight" if (work / "straight" / "model.json").is_file() else None
    if run is None:
        raise RuntimeError("no model: the resume step did not write one")
    app = create_app(load(run, device="cuda", backend="bf16"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/predict"
    images = [p.read_bytes() for p in sorted((data / "val").rglob("*")) if p.is_file()][:32]
    try:
        with httpx.Client(timeout=60) as client:

            def one(i: int) -> float:
                started = time.perf_counter()
                client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"}).raise_for_status()
                return time.perf_counter() - started

            started = time.perf_counter()
            with ThreadPoolExecutor(32) as pool:
                latencies = sorted(pool.map(one, range(256)))
            seconds = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return {"images_per_s": round(256 / seconds, 1), "p50_ms": round(1000 * statistics.median(latencies), 1), "p95_ms": round(1000 * latencies[int(0.95 * 255)], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="where every figure goes (default gpu_check.json)")
    parser.add_argument("--work", default=None, help="scratch folder for datasets and runs (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be measured, measure nothing")
    args = parser.parse_args()
    if args.dry_run:
        print("| step | would measure |\n|---|---|")
        for name, what in STEPS.items():
            print(f"| {name} | {what} |")
        Path(args.json).write_text(json.dumps({"dry_run": True, "steps": STEPS}, indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here; `python benchmarks/gpu_check.py --dry-run` shows what this measures on one", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="imgrec-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in STEPS:
        started = time.perf_counter()
        try:
            results[name] = {**globals()[f"step_{name}"](work), "seconds": round(time.perf_counter() - started, 1)}
        except Exception as exc:  # one step's failure is a finding, not the end of the check
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("| step | result | seconds |\n|---|---|---|")
    for name in STEPS:
        row = {k: v for k, v in results[name].items() if k != "seconds"}
        print(f"| {name} | {json.dumps(row)} | {results[name]['seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
