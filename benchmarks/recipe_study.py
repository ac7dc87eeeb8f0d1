"""The measurements behind the recipe's rules (``imgrec.recipe.RULES``): one setting varied at a time
around imgrec's defaults, on small real datasets of different kinds (``real_datasets.py``).

For each dataset, each variant and each seed, ``imgrec.train`` runs with only ``--data``,
``--model``, ``--epochs`` and ``--seed`` given, plus the variant's settings; the table shows the
best val top-1 (median over the seeds) and the wall time. Results go to ``--json`` as they
come, and a rerun skips what that file already holds, so a long study can be stopped and
continued.

    python benchmarks/recipe_study.py [--datasets sklearn-digits ...] [--variants default lr-2e-3 ...]
        [--seeds 0 1] [--epochs 8] [--model resnet18] [--root /tmp/real_datasets] [--json study.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from real_datasets import build  # noqa: E402

DATASETS = ("sklearn-digits", "opencv-digits", "fashion-mnist", "skimage-textures", "skimage-photos")
# name -> train() keyword arguments (``data_config`` keys merge into the data config)
VARIANTS = {
    "default": {},
    "lr-1e-3": {"base_lr": 1e-3},
    "lr-2e-3": {"base_lr": 2e-3},
    "lr-4e-3": {"base_lr": 4e-3},
    "lr-16e-3": {"base_lr": 16e-3},
    "lr-auto": {"lr": "auto"},
    "batch-32": {"batch_size": 32},
    "batch-128": {"batch_size": 128},
    "scale-0.08": {"data_config": {"scale": (0.08, 1.0)}},
    "scale-0.6": {"data_config": {"scale": (0.6, 1.0)}},
    "scale-1": {"data_config": {"scale": (1.0, 1.0)}},
    "no-flip": {"data_config": {"hflip": 0.0}},
    "crop-0.875": {"data_config": {"crop_pct": 0.875}},
    "warmup-1": {"warmup_epochs": 1.0},
    "no-warmup": {"warmup_epochs": 0.0},
    "ema": {"ema_decay": 0.998},
    "no-smoothing": {"label_smoothing": 0.0},
    "mixup": {"mixup": 0.2, "cutmix": 1.0},
    "files": {"cache": False},
}


def run(data: Path, variant: dict, *, model: str, epochs: int, seed: int, work: Path) -> dict:
    from imgrec.engine.tasks.classify import train

    options = {k: v for k, v in variant.items() if k != "data_config"}
    started = time.perf_counter()
    out = train(
        data=str(data), model=model, epochs=epochs, seed=seed, out=str(work / f"run-{time.monotonic_ns()}"), tensorboard=False,
        data_config=dict(variant.get("data_config", {})), console=Console(file=io.StringIO()), **options,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = (out / "config.yaml").read_text()
    return {"best": max(r["val_top1"] for r in rows), "last": rows[-1]["val_top1"], "seconds": round(seconds, 1), "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--root", type=Path, default=Path("/tmp/real_datasets"))
    parser.add_argument("--json", type=Path, default=Path("recipe_study.json"))
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = args.root / name
            build(name, data)
            for variant in args.variants:
                for seed in args.seeds:
                    key = f"{name}|{args.model}|{args.epochs}|{variant}|{seed}"
                    if key in results:
                        continue
                    results[key] = run(data, VARIANTS[variant], model=args.model, epochs=args.epochs, seed=seed, work=Path(tmp))
                    args.json.write_text(json.dumps(results, indent=1))
                    print(f"{key}: best {results[key]['best']:.2f}, last {results[key]['last']:.2f}, {results[key]['seconds']} s", flush=True)
    print_table(results, args)


def print_table(results: dict, args: argparse.Namespace) -> None:
    print(f"\nbest val top-1 (median of seeds {args.seeds}), {args.model}, {args.epochs} epochs; wall seconds")
    print(f"{'variant':14s}" + "".join(f"{name[:16]:>18s}" for name in args.datasets))
    for variant in args.variants:
        cells = []
        for name in args.datasets:
            runs = [results.get(f"{name}|{args.model}|{args.epochs}|{variant}|{seed}") for seed in args.seeds]
            runs = [r for r in runs if r]
            cells.append(f"{statistics.median(r['best'] for r in runs):7.2f} {statistics.median(r['seconds'] for r in runs):6.0f}s" if runs else " " * 14)
        print(f"{variant:14s}" + "".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
