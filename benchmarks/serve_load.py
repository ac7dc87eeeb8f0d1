"""Load test of ``imgrec serve`` on loopback: N clients for T seconds, ~5% of requests malformed.

Starts ``imgrec serve RUN`` on a free 127.0.0.1 port (a separate process, as in production),
waits until it is ready, warms it up, then runs ``--clients`` concurrent clients (asyncio +
httpx, one keep-alive connection each) for ``--seconds``. Each request is, at random:

- valid (95%): one image of RUN's val split, as an Open Inference Protocol v2 infer request
  with a binary BYTES input (4 in 5) or a multipart ``POST /predict`` upload (1 in 5);
- malformed (``--malformed``, default 5%), one of: random bytes, a truncated JPEG, an empty
  upload, a PNG header declaring 40,000 x 40,000 pixels, a body over the size limit, INT32
  data, an FP32 tensor of the wrong size, an unknown model, broken JSON, a binary size that
  does not match.

Reported: requests/s and images/s of the valid requests, their p50/p99 latency, answers by
status and by error kind, connection errors, and the server's RSS (from /proc) when ready,
after the warm-up and at the end. Targets: no 5xx, no dropped connection, every malformed
request answered 4xx and every valid one 200, RSS growth after the warm-up under 10%.

    python benchmarks/serve_load.py [--run runs/demo] [--clients 16] [--seconds 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx

from imgrec.card import ModelCard

MAX_BODY_MB = 1  # the server's limit in this test, so that an over-size body is cheap to send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def infer_body(header: dict, binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + binary, {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def bytes_input(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in images)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "parameters": {"binary_data_size": len(blob)}}
    return infer_body({"inputs": [tensor], "parameters": {"binary_data_output": True}}, blob)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width`` x ``height``: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def malformed_requests(model: str, image: bytes, size: int) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """kind -> (path, body, headers) of each malformed request."""
    rng = random.Random(0)
    infer = f"/v2/models/{model}/infer"

    def tensor(datatype: str, shape: list[int], data: list) -> tuple[bytes, dict[str, str]]:
        return json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}).encode(), {"Content-Type": "application/json"}

    body, headers = bytes_input([image])
    return {
        "random_bytes": (infer, *bytes_input([rng.randbytes(2000)])),
        "truncated_jpeg": (infer, *bytes_input([image[: len(image) // 3]])),
        "empty_upload": ("/predict", b"", {"Content-Type": "image/jpeg"}),
        "too_many_pixels": (infer, *bytes_input([png_declaring(40_000, 40_000)])),
        "body_too_large": (infer, *bytes_input([rng.randbytes(MAX_BODY_MB * 2**20 + 1000)])),
        "int32_input": (infer, *tensor("INT32", [1, 3, 4, 4], [0] * 48)),
        "wrong_shape": (infer, *tensor("FP32", [1, 3, size // 2, size // 2], [0.0] * (3 * (size // 2) ** 2))),
        "unknown_model": (f"/v2/models/{model}-nope/infer", body, headers),
        "broken_json": (infer, b'{"inputs": [', {"Content-Type": "application/json"}),
        "size_mismatch": (infer, body[:-10], headers),
    }


async def client(url: str, model: str, images: list[bytes], bad: dict, deadline: float, fraction: float, seed: int, log: list) -> None:
    rng = random.Random(seed)
    kinds = sorted(bad)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        while time.monotonic() < deadline:
            if rng.random() < fraction:
                kind = rng.choice(kinds)
                path, body, headers = bad[kind]
                send = dict(content=body, headers=headers)
            else:
                image = rng.choice(images)
                if rng.random() < 0.2:
                    kind, path, send = "valid_predict", "/predict", dict(files={"file": ("image.jpg", image, "image/jpeg")})
                else:
                    body, headers = bytes_input([image])
                    kind, path, send = "valid_infer", f"/v2/models/{model}/infer", dict(content=body, headers=headers)
            started = time.perf_counter()
            try:
                response = await http.post(path, **send)
                status, answer = response.status_code, response.headers.get("content-type", "")
                error = response.json().get("kind") if status >= 400 and "json" in answer else None
            except httpx.HTTPError as exc:
                status, error = None, type(exc).__name__
            log.append((kind, status, error, time.perf_counter() - started))


async def load(url: str, model: str, images: list[bytes], bad: dict, seconds: float, clients: int, fraction: float, seed: int) -> list:
    log: list = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(url, model, images, bad, deadline, fraction, seed * 1000 + i, log) for i in range(clients)))
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/demo", help="a model directory with a val split (make demo makes runs/demo)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--malformed", type=float, default=0.05, help="fraction of malformed requests")
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--no-pad-batches", action="store_true", help="serve with --no-pad-batches: the network at every batch size (to measure what padding does)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server to be ready (--backend compile builds every batch shape first)")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    if not 0 < args.seconds <= 600 or not 0 < args.clients <= 256:
        raise SystemExit("--seconds must be in (0, 600] and --clients in (0, 256]: this is a bounded loopback test")
    run = Path(args.run)
    card = ModelCard.read(run)
    import yaml

    val = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]) / "val"
    files = sorted(val.rglob("*.jpg"))[:200]
    if not files:
        raise SystemExit(f"no JPEGs under {val}: run make demo first")
    images = [f.read_bytes() for f in files]
    model, port = "bench", free_port()
    command = [
        sys.executable, "-m", "imgrec", "serve", str(run), "--port", str(port), "--name", model, "--backend", args.backend,
        "--max-batch", str(args.max_batch), "--max-body-mb", str(MAX_BODY_MB), *(["--no-pad-batches"] if args.no_pad_batches else []),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stdout.read()[-2000:]}")
            time.sleep(0.1)
        else:
            raise SystemExit(f"the server was not ready after {args.ready_timeout:.0f} s (--ready-timeout)")
        bad = malformed_requests(model, images[0], card.img_size)
        rss_ready = rss_mib(server.pid)
        asyncio.run(load(url, model, images, bad, args.warmup, args.clients, args.malformed, seed=1))
        rss_before = rss_mib(server.pid)
        started = time.perf_counter()
        log = asyncio.run(load(url, model, images, bad, args.seconds, args.clients, args.malformed, seed=2))
        elapsed = time.perf_counter() - started
        rss_after = rss_mib(server.pid)
        alive = httpx.get(url + "/v2/health/live", timeout=5).status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=5).text
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    valid = [r for r in log if r[0].startswith("valid")]
    malformed = [r for r in log if not r[0].startswith("valid")]
    ok_latency = sorted(r[3] for r in valid if r[1] == 200)
    by_status = collections.Counter(str(r[1]) for r in log)
    by_kind = collections.Counter(f"{r[0]} -> {r[1]} {r[2] or ''}".strip() for r in malformed)
    batch_sum = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("imgrec_batch_size_sum"))
    batch_count = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("imgrec_batch_size_count"))
    result = {
        "run": str(run), "architecture": card.architecture, "img_size": card.img_size, "clients": args.clients, "seconds": round(elapsed, 1),
        "requests": len(log), "valid": len(valid), "malformed": len(malformed),
        "valid_per_s": round(sum(r[1] == 200 for r in valid) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ok_latency), 1) if ok_latency else None,
        "p99_ms": round(1000 * ok_latency[min(len(ok_latency) - 1, round(0.99 * (len(ok_latency) - 1)))], 1) if ok_latency else None,
        "by_status": dict(by_status), "malformed_by_kind": dict(sorted(by_kind.items())),
        "server_5xx": sum(1 for r in log if r[1] is not None and r[1] >= 500),
        "dropped": sum(1 for r in log if r[1] is None),
        "valid_not_200": sum(1 for r in valid if r[1] != 200),
        "malformed_not_4xx": sum(1 for r in malformed if r[1] is None or not 400 <= r[1] < 500),
        "mean_batch": round(batch_sum / batch_count, 2) if batch_count else None,
        "rss_ready_mib": round(rss_ready, 1), "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
        "rss_growth_pct": round(100 * (rss_after / rss_before - 1), 2), "alive_after": alive,
    }  # fmt: skip
    result["targets_met"] = (
        result["server_5xx"] == 0 and result["dropped"] == 0 and result["valid_not_200"] == 0 and result["malformed_not_4xx"] == 0
        and result["rss_growth_pct"] < 10 and alive
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["targets_met"] else 1)


if __name__ == "__main__":
    main()
