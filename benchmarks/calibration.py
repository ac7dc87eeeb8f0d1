"""Calibration on real data: ECE, NLL and Brier score on unseen images before and after `imgrec
calibrate`, with top-1 (which must not move).

For each dataset (an ImageFolder root with train/ and val/, e.g. from benchmarks/real_datasets.py)
the val images are split per class into two halves by a fixed order: one half is the run's
validation set and the set the temperature is fitted on (`imgrec calibrate RUN --data ROOT`), the
other half is a test set that neither training nor calibration sees, on which everything is
measured. Training is `imgrec train` with the recipe's defaults for --model and --epochs.

    python benchmarks/calibration.py digits=/tmp/real_datasets/sklearn-digits \\
        textures=/tmp/real_datasets/skimage-textures --model resnet18 --epochs 15 --seeds 0 1 2 \\
        --out /tmp/calibration
    # a markdown table on stdout, OUT/calibration.json with every run's figures
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

KEYS = ("top1", "ece", "nll", "brier")


def split_val(root: Path, out: Path) -> Path:
    """OUT/data: train/ linked to ROOT's, val/ and test/ each holding every other val image of each class."""
    data = out / "data"
    if (data / "test").is_dir():
        return data
    (data / "val").mkdir(parents=True, exist_ok=True)
    (data / "test").mkdir(parents=True, exist_ok=True)
    os.symlink((root / "train").resolve(), data / "train")
    for folder in sorted(p for p in (root / "val").iterdir() if p.is_dir()):
        for half in ("val", "test"):
            (data / half / folder.name).mkdir(exist_ok=True)
        for i, image in enumerate(sorted(folder.iterdir())):
            os.symlink(image.resolve(), data / ("val" if i % 2 == 0 else "test") / folder.name / image.name)
    return data


def ece_floor(bins: list[dict]) -> float:
    """The ECE (percent) a perfectly calibrated model with these bins' confidences would still show
    on this many images, from sampling alone: each bin's accuracy is then a binomial proportion
    around its confidence, whose mean absolute deviation is about sqrt(2 c (1 - c) / (pi n))."""
    total = sum(b["n"] for b in bins)
    return 100.0 * sum(b["n"] / total * math.sqrt(2 * b["confidence"] * (1 - b["confidence"]) / (math.pi * b["n"])) for b in bins if b["n"])


def one_run(name: str, data: Path, out: Path, model: str, epochs: int, seed: int) -> dict:
    from imgrec.engine.calibrate import calibrate
    from imgrec.engine.evaluate import evaluate
    from imgrec.engine.tasks.classify import train
    from rich.console import Console

    run = out / f"{name}-seed{seed}"
    started = time.perf_counter()
    if not (run / "model.json").is_file():  # a rerun measures the trained run again
        train(data=str(data), out=str(run), model=model, epochs=epochs, seed=seed, tensorboard=False, console=Console(quiet=True))
    trained = time.perf_counter() - started
    card = json.loads((run / "model.json").read_text())
    card.pop("temperature", None), card.pop("calibration", None)  # a rerun starts uncalibrated
    (run / "model.json").write_text(json.dumps(card, indent=2))
    before = evaluate(run, data / "test", workers=0)
    try:
        fitted = calibrate(run, data, workers=0)  # the root's val/: the half the run validated on
    except ValueError as exc:  # too few mistakes to fit on: refused, the model left as it was
        return {"dataset": name, "seed": seed, "refused": str(exc), "top1_before": before["top1"], "ece_before": before["ece"], "test_images": before["n"]}
    after = evaluate(run, data / "test", workers=0)
    return {
        "dataset": name, "seed": seed, "model": model, "epochs": epochs, "train_s": round(trained, 1), "temperature": fitted["temperature"],
        "fitted_on": fitted["images"], "test_images": before["n"],
        **{f"{k}_before": before[k] for k in KEYS}, **{f"{k}_after": after[k] for k in KEYS}, "ece_floor": ece_floor(after["reliability"]),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", metavar="NAME=ROOT")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/imgrec-calibration")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for spec in args.datasets:
        name, _, root = spec.partition("=")
        if not Path(root, "val").is_dir():
            sys.exit(f"error: {root} has no val/ folder: pass an ImageFolder root (benchmarks/real_datasets.py writes them)")
        data = split_val(Path(root), out / name)
        for seed in args.seeds:
            rows.append(one_run(name, data, out, args.model, args.epochs, seed))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "calibration.json").write_text(json.dumps(rows, indent=2))
    print("| dataset | top-1 before / after | ECE % before | ECE % after | sampling floor of ECE % | NLL before / after | Brier before / after | T | fitted on / test images |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["dataset"] for r in rows):
        refused = [r for r in rows if r["dataset"] == name and "refused" in r]
        if refused:
            print(f"| {name} | {refused[0]['top1_before']:.2f} | {refused[0]['ece_before']:.2f} | refused ({len(refused)} of {len(args.seeds)} seeds): {refused[0]['refused'][:120]} | | | | | |")
        mine = [r for r in rows if r["dataset"] == name and "refused" not in r]
        if not mine:
            continue
        med = {key: statistics.median(r[key] for r in mine) for key in mine[0] if isinstance(mine[0][key], (int, float))}
        print(
            f"| {name} | {med['top1_before']:.2f} / {med['top1_after']:.2f} | {med['ece_before']:.2f} | **{med['ece_after']:.2f}** | {med['ece_floor']:.2f} "
            f"| {med['nll_before']:.3f} / {med['nll_after']:.3f} | {med['brier_before']:.3f} / {med['brier_after']:.3f} | {med['temperature']:.2f} "
            f"| {mine[0]['fitted_on']} / {mine[0]['test_images']} |"
        )
    print(f"\nmedians of {len(args.seeds)} seeds; per run: {out / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
