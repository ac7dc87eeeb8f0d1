"""The least a short training run can take on this machine: start-up (importing torch, torchvision
and timm, which imgrec, the plain loop and timm's train.py all do) plus the bare optimizer steps
and evaluations of the same model, batch and image size (bf16 autocast, channels_last, fused
AdamW, denormals flushed, as imgrec runs them), on tensors already in memory: no data loading,
no checkpoints, no logging. Set beside ``time_to_accuracy.py``'s wall times, it shows
how much of each side's time is this floor and how much its own overhead.

    python benchmarks/compute_floor.py [--images 1438 --val 359 --classes 10 --size 32 --batch 64 --epochs 8 --model resnet18]

Each part is timed in a fresh process (``--runs`` of them; the median is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import torch, torchvision, timm
imports = time.perf_counter() - started
a = json.loads(sys.argv[1])
torch.set_flush_denormal(a["flush_denormal"])
torch.manual_seed(0)
model = timm.create_model(a["model"], num_classes=a["classes"]).to(memory_format=torch.channels_last)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, fused=True)
steps = a["images"] // a["batch"]
x = torch.randn(a["batch"], 3, a["size"], a["size"]).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, a["classes"], (a["batch"],))
val = torch.randn(a["val"], 3, a["size"], a["size"]).contiguous(memory_format=torch.channels_last)
train_s = eval_s = 0.0
for epoch in range(a["epochs"]):
    t = time.perf_counter()
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s += time.perf_counter() - t
    t = time.perf_counter()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in val.split(a["batch"]):
            model(batch)
    eval_s += time.perf_counter() - t
print(json.dumps({"imports": imports, "steps": train_s, "eval": eval_s, "step_ms": 1000 * train_s / (steps * a["epochs"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=1438, help="training images (sklearn-digits: 1,438)")
    parser.add_argument("--val", type=int, default=359)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false", help="leave denormal floats on (imgrec flushes them)")
    args = parser.parse_args()
    settings = json.dumps({k: getattr(args, k) for k in ("model", "images", "val", "classes", "size", "batch", "epochs", "flush_denormal")})
    runs = []
    for _ in range(args.runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, settings], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["process"] = time.perf_counter() - started
        runs.append(result)
        print({k: round(v, 2) for k, v in result.items()}, flush=True)
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    print(f"median of {args.runs}: {median}")


if __name__ == "__main__":
    main()
