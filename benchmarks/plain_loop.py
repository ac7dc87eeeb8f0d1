"""The hand-written training loop a practitioner writes from the torchvision and timm docs: the
reference side of ``time_to_accuracy.py``. Not imgrec: torchvision's ImageFolder and transforms,
a DataLoader, a timm model, AdamW with a one-cycle schedule, cross-entropy, fp32.

    python benchmarks/plain_loop.py --data DIR --model resnet18 --img-size 32 --epochs 8 --lr 2e-3 [--seed 0]

Prints one JSON line: the best and last val top-1 (percent) over the epochs, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import time

started = time.perf_counter()

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.0))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.img_size, scale=tuple(args.scale)), transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(args.img_size), transforms.CenterCrop(args.img_size), transforms.ToTensor(), normalize])
    rgb = lambda path: datasets.folder.default_loader(path)  # noqa: E731  (PIL, converted to RGB)
    train_set = datasets.ImageFolder(f"{args.data}/train", train_tf, loader=rgb)
    val_set = datasets.ImageFolder(f"{args.data}/val", eval_tf, loader=rgb)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256, num_workers=args.workers)
    model = timm.create_model(args.model, num_classes=len(train_set.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * len(train_loader))
    criterion = torch.nn.CrossEntropyLoss()
    accuracies = []
    for _ in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
            schedule.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        accuracies.append(100.0 * correct / len(val_set))
    print(json.dumps({"best": max(accuracies), "last": accuracies[-1], "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
