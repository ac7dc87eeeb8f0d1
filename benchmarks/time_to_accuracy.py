"""Time to accuracy on small real datasets: imgrec with its defaults against a hand-written loop and
timm's train.py, same model, epochs and image size, each a fresh process as a user runs it.

- imgrec: ``imgrec train --data D --model M --epochs E --seed S``: nothing else; the recipe picks
  the rest from the data.
- plain (a): ``plain_loop.py`` (torchvision ImageFolder + RandomResizedCrop 0.6-1, AdamW,
  one-cycle, batch 64, fp32), with each of three learning rates; the best one counts.
- timm (b): timm's ``train.py`` (``--timm-train PATH``; its source is in timm's repository, run
  with that repository on PYTHONPATH) with plain's best recipe, in bf16 with channels_last. The
  column is left out when no path is given.

The image size is the one imgrec's recipe picks for the data (the images' own size, at least 32
px), given explicitly to the other two. Each seed runs every side in turn (interleaved, the order
rotated per seed), each from a flushed disk; the table shows the median over the seeds of the
best val top-1 over the epochs and of the wall time. Targets: imgrec's top-1 at least plain's best (within one val
image) on every dataset, in at most 2/3 of timm's wall time.

    python benchmarks/time_to_accuracy.py [--datasets sklearn-digits fashion-mnist skimage-photos]
        [--epochs 8] [--seeds 0 1 2] [--model resnet18] [--timm-train /path/to/train.py] [--json tta.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from real_datasets import build  # noqa: E402

PLAIN_LRS = (1e-3, 2e-3, 4e-3)


def image_size(data: Path, model: str) -> int:
    """The input size imgrec's recipe picks for ``data`` (so that every side trains at the same size)."""
    from imgrec.data.folder import ImageFolderDataset
    from imgrec.data.stats import dataset_stats
    from imgrec.models.factory import create_model
    from imgrec.recipe import architecture_preprocessing, pick_image_size

    stats = dataset_stats(ImageFolderDataset(data / "train"))
    architecture = architecture_preprocessing(create_model(model, num_classes=0))
    chosen = {c.name: c.value for c in pick_image_size(stats, architecture, {}, None)}
    return chosen.get("img_size", architecture["img_size"])


def timed(command: list[str], env: dict | None = None) -> tuple[float, str, float]:
    """Run ``command``; its wall time, its stdout, and the seconds ``os.sync()`` then takes to put
    the files it left in the page cache on disk. The disk is flushed first too (untimed), so that
    no side pays for the writes of the run before it. imgrec fsyncs its checkpoints inside its run
    (they survive a power cut); timm's train.py writes ~1 GB of checkpoints for resnet18 in 8
    epochs without fsync, which the kernel writes back later: the sync time shows that cost, so the
    table can give both figures, without and with each side's files made durable."""
    os.sync()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    started = time.perf_counter()
    os.sync()
    return seconds, done.stdout, time.perf_counter() - started


def warm_up() -> None:
    """Untimed: import what every side imports (torch, torchvision, timm, imgrec's trainer), so that
    the first timed run does not pay alone for reading the libraries from disk and compiling
    imgrec's bytecode (measured: the first run of a fresh checkout took 30.6 s, the next 19.8 s)."""
    subprocess.run([sys.executable, "-c", "import torch, torchvision, timm, imgrec.engine.tasks.classify"], check=True)


def run_imgrec(data: Path, args: argparse.Namespace, seed: int, out: Path) -> dict:
    imgrec = [str(Path(sys.executable).with_name("imgrec"))]
    seconds, _, sync = timed([*imgrec, "train", "--data", str(data), "--model", args.model, "--epochs", str(args.epochs), "--seed", str(seed), "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"best": max(r["val_top1"] for r in rows), "last": rows[-1]["val_top1"], "seconds": round(seconds, 1), "sync": round(sync, 2)}


def run_plain(data: Path, args: argparse.Namespace, seed: int, size: int, lr: float) -> dict:
    command = [sys.executable, str(HERE / "plain_loop.py"), "--data", str(data), "--model", args.model, "--img-size", str(size),
               "--epochs", str(args.epochs), "--lr", str(lr), "--seed", str(seed)]  # fmt: skip
    seconds, stdout, sync = timed(command)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"best": result["best"], "last": result["last"], "seconds": round(seconds, 1), "sync": round(sync, 2)}


def run_timm(data: Path, args: argparse.Namespace, seed: int, size: int, lr: float, out: Path) -> dict:
    classes = len([p for p in (data / "train").iterdir() if p.is_dir()])
    command = [
        sys.executable, str(args.timm_train), "--data-dir", str(data), "--train-split", "train", "--val-split", "val", "--model", args.model,
        "--num-classes", str(classes), "--img-size", str(size), "--crop-pct", "1.0", "--epochs", str(args.epochs), "-b", "64",
        "--opt", "adamw", "--lr", str(lr), "--weight-decay", "0.01", "--sched", "cosine", "--warmup-epochs", str(max(1, round(0.3 * args.epochs))), "--scale", "0.6", "1",
        "--hflip", "0", "--reprob", "0", "--smoothing", "0", "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--device", "cpu",
        "--workers", "2", "--no-prefetcher", "--seed", str(seed), "--output", str(out), "--log-interval", "100000",
    ]  # fmt: skip
    seconds, stdout, sync = timed(command, env={"PYTHONPATH": str(Path(args.timm_train).parent)})
    tops = [float(m) for m in re.findall(r'"top1": ([0-9.]+)', stdout)]
    return {"best": max(tops), "last": tops[-1], "seconds": round(seconds, 1), "sync": round(sync, 2)}


def run_floor(args: argparse.Namespace, size: int, data: Path) -> dict:
    """The compute floor (``compute_floor.py``'s child, one fresh process): imports, then the bare
    steps and evaluations of the same model, batch, image size and image counts, no data, no files."""
    from compute_floor import CHILD

    counts = {split: sum(1 for p in (data / split).rglob("*") if p.is_file()) for split in ("train", "val")}
    classes = len([p for p in (data / "train").iterdir() if p.is_dir()])
    settings = {"model": args.model, "images": counts["train"], "val": counts["val"], "classes": classes, "size": size, "batch": 64,
                "epochs": args.epochs, "flush_denormal": True}  # fmt: skip
    seconds, _, sync = timed([sys.executable, "-c", CHILD, json.dumps(settings)])
    return {"best": 0.0, "last": 0.0, "seconds": round(seconds, 1), "sync": round(sync, 2)}


def one_seed(name: str, data: Path, args: argparse.Namespace, seed: int, size: int, results: dict, work: Path) -> None:
    """Every side once for ``seed``, in an order rotated by the seed."""
    sides = [("imgrec", None), *[("plain", lr) for lr in PLAIN_LRS], *([("timm", None)] if args.timm_train else []), *([("floor", None)] if args.floor else [])]
    shift = seed % len(sides)
    for side, lr in sides[shift:] + sides[:shift]:
        key = f"{name}|{args.model}|{args.epochs}|{side}|{lr}|{seed}"
        if key in results:
            continue
        if side == "imgrec":
            results[key] = run_imgrec(data, args, seed, work / key.replace("|", "-"))
        elif side == "plain":
            results[key] = run_plain(data, args, seed, size, lr)
        elif side == "floor":
            results[key] = run_floor(args, size, data)
        else:
            results[key] = run_timm(data, args, seed, size, best_plain_lr(results, name, args), work / key.replace("|", "-"))
        args.json.write_text(json.dumps(results, indent=1))
        print(f"{key}: best {results[key]['best']:.2f}, {results[key]['seconds']} s (+ {results[key].get('sync', 0)} s to sync its files)", flush=True)


def best_plain_lr(results: dict, name: str, args: argparse.Namespace) -> float:
    """The plain loop's learning rate with the best median top-1 over the seeds measured so far."""
    def score(lr: float) -> float:
        runs = [v["best"] for k, v in results.items() if k.startswith(f"{name}|{args.model}|{args.epochs}|plain|{lr}|")]
        return statistics.median(runs) if runs else -1.0

    return max(PLAIN_LRS, key=score)


def summary(results: dict, name: str, args: argparse.Namespace) -> dict:
    def side(prefix: str) -> dict:
        runs = [v for k, v in results.items() if k.startswith(prefix)]
        if not runs:
            return {}
        durable = statistics.median(r["seconds"] + r.get("sync", 0.0) for r in runs)
        return {"best": statistics.median(r["best"] for r in runs), "seconds": statistics.median(r["seconds"] for r in runs), "durable": durable, "runs": len(runs)}

    base = f"{name}|{args.model}|{args.epochs}"
    lr = best_plain_lr(results, name, args)
    return {"imgrec": side(f"{base}|imgrec|"), "plain": {**side(f"{base}|plain|{lr}|"), "lr": lr}, "timm": side(f"{base}|timm|"), "floor": side(f"{base}|floor|")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sklearn-digits", "fashion-mnist", "skimage-photos"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--timm-train", type=Path, help="timm's train.py (from its repository); without it the timm column is left out")
    parser.add_argument("--root", type=Path, default=Path("/tmp/real_datasets"))
    parser.add_argument("--floor", action="store_true", help="also time the compute floor (compute_floor.py: imports + bare steps, no data, no files) beside the others")
    parser.add_argument("--json", type=Path, default=Path("time_to_accuracy.json"))
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = args.root / name
            build(name, data)
            size = image_size(data, args.model)
            warm_up()
            for seed in args.seeds:
                one_seed(name, data, args, seed, size, results, Path(tmp))
    print(f"\n{args.model}, {args.epochs} epochs; median over seeds {args.seeds} of the best val top-1 and of the wall time")
    for name in args.datasets:
        s = summary(results, name, args)
        imgrec, plain, timm, floor = s["imgrec"], s["plain"], s["timm"], s["floor"]
        line = f"{name:18s} imgrec {imgrec['best']:6.2f}% {imgrec['seconds']:6.1f} s | plain (lr {plain['lr']:g}) {plain['best']:6.2f}% {plain['seconds']:6.1f} s"
        if timm:
            line += f" | timm {timm['best']:6.2f}% {timm['seconds']:6.1f} s | imgrec/timm time {imgrec['seconds'] / timm['seconds']:.2f}"
            line += f" (files synced: {imgrec['durable']:.1f} / {timm['durable']:.1f} s = {imgrec['durable'] / timm['durable']:.2f})"
        if floor and timm:
            line += f" | floor {floor['seconds']:.1f} s, floor/timm {floor['seconds'] / timm['seconds']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
