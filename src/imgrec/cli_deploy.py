"""The deployment commands of ``imgrec``: export, benchmark and serve. Thin layers over
``imgrec.export``, ``imgrec.benchmark`` and ``imgrec.serve``; no logic lives here."""

from __future__ import annotations

import argparse
import json


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="export a model directory to ONNX or TorchScript, checked against the eager model on real images")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--int8", action="store_true", help="ONNX only: post-training int8 quantisation (onnxruntime), calibrated on --calibration images")
    p.add_argument("--out", help="output file (default: RUN/model.onnx, model.int8.onnx or model.torchscript.pt)")
    p.add_argument("--images", help="folder of images for the parity check and calibration (default: the run's val split)")
    p.add_argument("--max-images", type=int, default=256, help="images the parity check runs on (default 256)")
    p.add_argument("--calibration", type=int, default=300, help="--int8: calibration images (default 300)")
    p.add_argument("--tolerance", type=float, help="largest |logit difference| allowed (default 1e-3; int8: not checked)")
    p.add_argument("--min-agreement", type=float, help="lowest top-1 agreement in percent (default 100; int8: 97)")
    p.add_argument("--json", metavar="FILE", help="also write the check's figures as JSON")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from imgrec.cli import console
    from imgrec.export import export

    report = export(
        args.run, args.format, out=args.out, int8=args.int8, images=args.images, max_images=args.max_images,
        calibration_images=args.calibration, tolerance=args.tolerance, min_agreement=args.min_agreement,
    )  # fmt: skip
    kind = f"{report.format}{' int8' if report.int8 else ''}"
    console.print(
        f"exported {kind}: {report.path} (+ {report.path.name}.json); against the eager model on {report.images} images: "
        f"max |logit difference| {report.max_abs_diff:.3g}, top-1 agreement {report.top1_agreement:.2f}%",
        highlight=False,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


def add_benchmark_parser(commands: argparse._SubParsersAction) -> None:
    from imgrec.benchmark import BACKENDS

    p = commands.add_parser("benchmark", help="latency (batch 1) and throughput of each inference backend, with top-1 agreement")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {', '.join(BACKENDS)} (default: all)")
    p.add_argument("--batch", type=int, default=32, help="batch of the throughput figure (default 32)")
    p.add_argument("--iterations", type=int, default=50, help="batch-1 calls for the latency percentiles (default 50)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of batches for each throughput figure (default 10)")
    p.add_argument("--images", help="folder of images for the agreement check and int8 calibration (default: the run's val split)")
    p.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(handler=run_benchmark)


def run_benchmark(args: argparse.Namespace) -> int:
    from rich.table import Table

    from imgrec.benchmark import benchmark, best_backend
    from imgrec.cli import console

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    results = benchmark(
        args.run, backends=backends, batch=args.batch, iterations=args.iterations, seconds=args.seconds, images=args.images, threads=args.threads
    )
    table = Table(title=f"{args.run}: batch 1 latency, batch {args.batch} throughput")
    for column in ("backend", "p50 ms", "p99 ms", "img/s", "vs eager", "top-1 agreement", "note"):
        table.add_column(column, justify="left" if column in ("backend", "note") else "right")
    for r in results:
        figures = [f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.images_per_s:.1f}", f"{r.speedup:.2f}x", f"{r.top1_agreement:.2f}%"] if r.images_per_s else ["-"] * 5
        table.add_row(r.backend, *figures, r.note)
    console.print(table)
    best = best_backend(results)
    console.print(f"best with >= 99% agreement: {best.backend}, {best.images_per_s:.1f} img/s ({best.speedup:.2f}x eager fp32)", highlight=False)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
    return 0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from imgrec.cli import add_backend_argument
    from imgrec.serve import ServeConfig

    d = ServeConfig()
    p = commands.add_parser("serve", help="serve a model directory over HTTP: Open Inference Protocol v2, POST /predict, a page at /, /metrics")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model's name in /v2/models/NAME (default: the run folder's name)")
    p.add_argument("--device", default="auto")
    add_backend_argument(p)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images in one forward pass (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help=f"how long a lone request waits for others to batch with (default {d.max_wait_ms:g})")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help=f"largest request body in MiB (default {d.max_body_bytes >> 20})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"largest image in pixels, read from its header (default {d.max_pixels:,})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"images in one request (default {d.max_images})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"images decoded or queued at once; past it requests get 503 (default {d.max_queue})")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imgrec.serve import ServeConfig, serve

    name = args.name or Path(args.run).resolve().name
    config = ServeConfig(
        name=name, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels, max_images=args.max_images, max_queue=args.max_queue,
    )  # fmt: skip
    serve(args.run, host=args.host, port=args.port, device=args.device, backend=args.backend, config=config, access_log=args.access_log)
    return 0
