"""Where a short run's time goes: ``imgrec.train`` with its defaults on a small real dataset, with
timers around each part of the loop (the code is not changed, only wrapped from outside).

Parts: start-up (``import imgrec``, torch and timm: timed in a fresh process), setup (the
Trainer: scan, data statistics, recipe, decoding the cache, model, optimizer), the optimizer
steps (less the wait for the next batch, i.e. the augmentation on the cached path, shown apart), the
validation, saving the best model (safetensors + card), the checkpoint (the copy made in the
loop, and any wait for the thread writing the previous one), metrics.jsonl/TensorBoard, and
what is left of each epoch. Each part's seconds exclude the parts timed inside it.

    python benchmarks/epoch_overheads.py [--data /tmp/real_datasets/sklearn-digits] [--model resnet18] [--epochs 8] [--no-cache]
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STACK: list[float] = []  # for each timed call in progress, the seconds of the timed calls nested in it


def timed(totals: dict, name: str, owner: object, attribute: str) -> None:
    """Wrap ``owner.attribute`` so that its calls add their own seconds (less those of the timed calls
    inside them) to ``totals[name]``."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        STACK.append(0.0)
        try:
            return original(*args, **kwargs)
        finally:
            spent = time.perf_counter() - started
            totals[name] += spent - STACK.pop()
            if STACK:
                STACK[-1] += spent

    setattr(owner, attribute, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/real_datasets/sklearn-digits")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--no-cache", action="store_true", help="the file pipeline (loader processes) instead of the cached fast path")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="further train() settings, e.g. precision=fp32 channels_last=false")
    args = parser.parse_args()

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import imgrec.engine.tasks.classify, timm, torch"], check=True)
    startup = time.perf_counter() - started

    from rich.console import Console

    from imgrec.engine import trainer as trainer_module
    from imgrec.engine.tasks.classify import ClassifyTask, train

    totals: dict[str, float] = collections.defaultdict(float)
    timed(totals, "setup", trainer_module.Trainer, "__init__")
    timed(totals, "steps", trainer_module.Trainer, "step")
    timed(totals, "  waiting for batches", trainer_module.Trainer, "next_batch")
    timed(totals, "validation", ClassifyTask, "validate")
    timed(totals, "saving the best model", ClassifyTask, "save")
    timed(totals, "checkpoint (copy, start the write)", trainer_module.Trainer, "save_checkpoint")
    timed(totals, "checkpoint (waiting for the write)", trainer_module.Trainer, "finish_checkpoint")
    timed(totals, "metrics.jsonl + TensorBoard", trainer_module, "write_metrics")
    timed(totals, "epochs", trainer_module.Trainer, "epoch")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        train(data=args.data, model=args.model, epochs=args.epochs, out=f"{tmp}/run", cache=False if args.no_cache else None, console=Console(file=io.StringIO()), **settings)
        total = time.perf_counter() - started

    parts = ["setup", "steps", "  waiting for batches", "validation", "saving the best model", "checkpoint (copy, start the write)",
             "checkpoint (waiting for the write)", "metrics.jsonl + TensorBoard"]  # fmt: skip
    rest = total - sum(totals[k] for k in parts) - totals["epochs"]
    print(f"{args.model} on {Path(args.data).name}, {args.epochs} epochs, {'files' if args.no_cache else 'defaults'} {' '.join(args.set)}: {startup + total:.1f} s in all")
    rows = [("start-up (imports, fresh process)", startup), *[(k, totals[k]) for k in parts], ("rest of the epochs", totals["epochs"]), ("outside the epochs and setup", rest)]
    for name, seconds in rows:
        print(f"| {name} | {seconds:6.2f} s | {seconds / args.epochs:5.2f} s/epoch | {100 * seconds / (startup + total):4.1f}% |")

if __name__ == "__main__":
    main()
