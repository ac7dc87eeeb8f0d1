"""Train-step throughput of ``imgrec train`` against the plain loop the torchvision/timm docs show.

Both sides train the same timm model at the same image size, batch and worker count on the same
folder of JPEGs, end to end (loading, augmentation, transfer, forward, backward, step):

- plain: torchvision ``ImageFolder`` + ``RandomResizedCrop`` + flip + ``ToTensor`` + ``Normalize``,
  a ``DataLoader``, fp32, ``CrossEntropyLoss``, AdamW; the loop from the tutorials.
- imgrec: the trainer's own epoch (``imgrec.engine.trainer.Trainer.epoch``) with its defaults:
  uint8 batches normalised on the device, bf16 autocast where the CPU has it, channels_last; the
  images/s of its metrics row time the training steps alone (not the validation after them).

Each side runs a short warm-up epoch (worker start, oneDNN kernel selection) and then a timed
epoch of ``--steps`` steps; the pair is repeated ``--runs`` times, interleaved, and the table
shows medians and the ratio. ``--accuracy`` also trains the demo recipe in fp32 and with the
defaults, to show the speed does not cost accuracy.

    python benchmarks/train_throughput.py [--runs 3] [--steps N] [--accuracy]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from imgrec.config import TrainConfig
from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.engine.tasks.classify import ClassifyTask
from imgrec.engine.trainer import Trainer

CASES = [("resnet18", 128, 64, 20), ("resnet50", 224, 32, 10)]  # model, image size, batch, timed steps


def plain_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """The tutorial loop; returns images/s over ``steps`` steps."""
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    started = time.perf_counter()
    images = 0
    for step, (inputs, targets) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        images += inputs.shape[0]
    return images / (time.perf_counter() - started)


def plain_setup(root: Path, name: str, size: int, batch: int, workers: int, classes: int):
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    model = timm.create_model(name, num_classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, loader, optimizer


def imgrec_setup(root: Path, out: Path, name: str, size: int, batch: int, workers: int) -> Trainer:
    config = TrainConfig(
        data=str(root), model=name, out=str(out), epochs=2, batch_size=batch, workers=workers, tensorboard=False,
        data_config={"img_size": size},
    )  # fmt: skip
    return Trainer(ClassifyTask, config, Console(file=io.StringIO()))


def measure(root: Path, work: Path, runs: int, steps_override: int | None, workers: int) -> list[dict]:
    rows = []
    for name, size, batch, case_steps in CASES:
        steps = steps_override or case_steps
        plain, ours = [], []
        for repeat in range(runs):
            torch.set_flush_denormal(False)  # the plain loop as the tutorials write it (imgrec's Trainer turns it on)
            model, loader, optimizer = plain_setup(root, name, size, batch, workers, classes=10)
            plain_epoch(model, loader, optimizer, steps=3)
            plain.append(plain_epoch(model, loader, optimizer, steps=steps))
            del model, loader, optimizer
            trainer = imgrec_setup(root, work / f"{name}-{repeat}", name, size, batch, workers)
            trainer.steps_per_epoch = 3
            trainer.epoch(1)
            trainer.steps_per_epoch = steps
            ours.append(trainer.epoch(2)["images_per_s"])
            precision = trainer.precision
            del trainer
            print(f"  {name} {size}px run {repeat + 1}: plain {plain[-1]:.1f} img/s, imgrec {ours[-1]:.1f} img/s", flush=True)
        rows.append(
            {"model": name, "size": size, "batch": batch, "steps": steps, "plain": statistics.median(plain), "imgrec": statistics.median(ours), "precision": precision,
             "plain_runs": plain, "imgrec_runs": ours}
        )  # fmt: skip
    return rows


def accuracy(work: Path) -> dict[str, dict[str, float]]:
    """Demo recipe, same seed, fp32 against the default precision: best and last val top-1, minutes."""
    from imgrec.demo import DEMO_RECIPE, demo_dataset
    from imgrec.engine.tasks.classify import train

    data = demo_dataset(work / "demo-data")
    results = {}
    for precision in ("fp32", "auto"):
        started = time.perf_counter()
        out = train(data=str(data), out=str(work / f"acc-{precision}"), console=Console(file=io.StringIO()), precision=precision, **DEMO_RECIPE)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[precision] = {"best": max(r["val_top1"] for r in rows), "last": rows[-1]["val_top1"], "minutes": (time.perf_counter() - started) / 60}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset root with train/ (default: the synthetic set, 96-320 px JPEGs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per epoch (default: 20 for resnet18, 10 for resnet50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true", help="also train the demo recipe in fp32 and with the defaults")
    parser.add_argument("--skip-throughput", action="store_true", help="only the --accuracy comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = args.data or args.skip_throughput or write_synth_dataset(work / "data", SynthSpec(classes=10, train_per_class=200, val_per_class=10))
        rows = [] if args.skip_throughput else measure(root, work, args.runs, args.steps, args.workers)
        if rows:
            print(f"\ntrain images/s, median of {args.runs} runs, {args.workers} workers, {torch.get_num_threads()} threads")
            print(f"{'model':10s} {'px':>4s} {'batch':>5s} {'plain fp32':>11s} {'imgrec':>8s} {'precision':>9s} {'ratio':>6s}")
            for r in rows:
                print(f"{r['model']:10s} {r['size']:4d} {r['batch']:5d} {r['plain']:11.1f} {r['imgrec']:8.1f} {r['precision']:>9s} {r['imgrec'] / r['plain']:5.2f}x")
        if args.accuracy:
            acc = accuracy(work)
            for name, r in acc.items():
                label = "fp32" if name == "fp32" else "default (auto)"
                print(f"demo recipe, {label}: best val top-1 {r['best']:.2f}%, last {r['last']:.2f}%, {r['minutes']:.1f} min")


if __name__ == "__main__":
    main()
