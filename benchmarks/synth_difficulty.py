"""Is the demo dataset a real learning task? Linear classifier on raw pixels vs a small CNN.

The synth issue asks for both: a linear model on raw pixels must stay below 50% top-1 (the
class must not be readable from colour or position), while a small CNN must learn it. Both
models see the same images through imgrec's own pipeline (EvalTransform at 64 px for the
linear model; TrainTransform / EvalTransform for the CNN). Prints one table; median over
``--runs`` seeds.

    python benchmarks/synth_difficulty.py [--data DIR] [--runs 3] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from imgrec.config import DataConfig
from imgrec.data.loader import create_loader
from imgrec.data.splits import load_splits
from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.data.transforms import BatchNormalize, EvalTransform, TrainTransform


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = create_loader(dataset, batch_size=256, train=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def linear_top1(train, val, seed: int) -> float:
    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva) = tensors(train), tensors(val)
    xtr, xva = xtr.flatten(1).float() / 255, xva.flatten(1).float() / 255
    mean, std = xtr.mean(0), xtr.std(0) + 1e-3
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    model = nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(300):  # full batch: the best a linear model can do, up to regularisation
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return (model(xva).argmax(1) == yva).float().mean().item() * 100


def small_cnn(classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def cnn_top1(root: Path, config: DataConfig, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    splits = load_splits(root, TrainTransform.from_config(config), EvalTransform.from_config(config))
    train_loader = create_loader(splits.train, batch_size=64, train=True, seed=seed)
    val_loader = create_loader(splits.val, batch_size=256, train=False)
    normalize = BatchNormalize.from_config(config)
    model = small_cnn(len(splits.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(train_loader))
    for _ in range(epochs):
        model.train()
        for images, labels in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(normalize(images)), labels, label_smoothing=0.1).backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in val_loader:
            correct += (model(normalize(images)).argmax(1) == labels).sum().item()
    return correct / len(splits.val) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="an imgrec synth folder (default: generate the default one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_synth_dataset(Path(tmp) / "synth", SynthSpec())
        config = DataConfig(img_size=args.img_size, crop_pct=1.0, interpolation="bilinear", scale=(0.35, 1.0))
        eval_tf = EvalTransform.from_config(config)
        splits = load_splits(root, eval_tf, eval_tf)
        chance = 100 / len(splits.classes)
        linear, cnn = [], []
        for run in range(args.runs):
            start = time.perf_counter()
            linear.append(linear_top1(splits.train, splits.val, seed=run))
            cnn.append(cnn_top1(root, config, args.epochs, seed=run))
            print(f"run {run}: linear {linear[-1]:.1f}%  cnn {cnn[-1]:.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nsynth difficulty: {len(splits.train)} train / {len(splits.val)} val images, {len(splits.classes)} classes, {args.img_size} px")
    print(f"| model | val top-1, median of {args.runs} (min-max) |")
    print("|---|---|")
    print(f"| chance | {chance:.1f} |")
    print(f"| linear on raw pixels | {statistics.median(linear):.1f} ({min(linear):.1f}-{max(linear):.1f}) |")
    print(f"| small CNN, {args.epochs} epochs | {statistics.median(cnn):.1f} ({min(cnn):.1f}-{max(cnn):.1f}) |")


if __name__ == "__main__":
    main()
