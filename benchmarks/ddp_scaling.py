"""Training throughput with 1 and 2 DDP processes on the CPU (torchrun, gloo), and one GPU's.

The CPU part runs the real command, ``torchrun --standalone --nproc_per_node N -m imgrec train``,
on a synth folder of JPEGs, N = 1 and 2, with the same per-rank batch (so 2 processes train a
global batch twice as large, as DDP users scale), the machine's cores split between the ranks
(threads and loader workers). Throughput is the images/s of the run's second epoch as
metrics.jsonl records it (every rank's images over the epoch's time), after a warm-up epoch.
The pair is repeated ``--runs`` times, interleaved; the table shows medians and the ratio.

On a machine with a GPU, ``--gpu`` also measures one GPU's training throughput for a model at
ImageNet size (default ResNet-50 at 224 px, bf16 autocast, channels_last, batch 256 per GPU)
on batches already in GPU memory: the model's ceiling, which the loader must then keep up with.
From it and a published recipe's epochs it prints an estimate of the wall time on 8 GPUs.

    python benchmarks/ddp_scaling.py [--runs 3] [--model resnet18] [--img-size 128] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.utils import available_cpus

IMAGENET_TRAIN_IMAGES = 1_281_167


def cpu_run(data: Path, out: Path, nproc: int, args: argparse.Namespace) -> float:
    """images/s of the second epoch of a ``nproc``-process run."""
    cores = available_cpus()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "imgrec", "train",
        "--data", str(data), "--out", str(out), "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch),
        "--epochs", "2", "--steps-per-epoch", str(args.steps), "--workers", str(max(1, cores // nproc)), "--no-tensorboard",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def gpu_throughput(model_name: str, img_size: int, batch: int, steps: int = 30) -> float:
    """images/s of forward + backward + AdamW step on one GPU, bf16 autocast, channels_last."""
    import timm
    import torch

    device = torch.device("cuda")
    model = timm.create_model(model_name, num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    inputs = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(10):  # cuDNN autotuning, allocator warm-up
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per epoch")
    parser.add_argument("--gpu", action="store_true", help="also measure one GPU (ResNet-50 at 224 px by default)")
    parser.add_argument("--gpu-model", default="resnet50")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--recipe-epochs", type=int, default=90, help="epochs of the published recipe for the 8-GPU estimate")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = 2 * args.batch * args.steps // 10 + 10  # enough for 2 ranks' steps
        data = write_synth_dataset(tmp / "data", SynthSpec(classes=10, train_per_class=per_class, val_per_class=4, min_side=128, max_side=256))
        rates: dict[int, list[float]] = {1: [], 2: []}
        for run in range(args.runs):
            for nproc in (1, 2):
                rates[nproc].append(cpu_run(data, tmp / f"run-{nproc}-{run}", nproc, args))
                print(f"run {run + 1}/{args.runs}, {nproc} process(es): {rates[nproc][-1]:.1f} img/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\n{args.model} at {args.img_size} px, batch {args.batch} per rank, {available_cpus()} CPU cores, gloo; median of {args.runs}")
    print(f"{'processes':>10} {'img/s':>8} {'per process':>12}")
    print(f"{1:>10} {one:>8.1f} {one:>12.1f}")
    print(f"{2:>10} {two:>8.1f} {two / 2:>12.1f}")
    print(f"2 vs 1 process: {two / one:.2f}x the throughput (the same cores, split)")

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("\n--gpu: no CUDA GPU here; skipped")
            return
        rate = gpu_throughput(args.gpu_model, 224, args.gpu_batch)
        name = torch.cuda.get_device_name()
        print(f"\none GPU ({name}): {args.gpu_model} at 224 px, bf16, channels_last, batch {args.gpu_batch}: {rate:.0f} img/s (data in GPU memory)")
        for efficiency in (1.0, 0.9):
            hours = args.recipe_epochs * IMAGENET_TRAIN_IMAGES / (8 * rate * efficiency) / 3600
            print(f"estimate, 8 such GPUs at {efficiency:.0%} scaling: {args.recipe_epochs} epochs of ImageNet in {hours:.1f} h (an estimate)")


if __name__ == "__main__":
    main()
