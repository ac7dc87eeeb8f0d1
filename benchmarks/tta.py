"""Test-time augmentation on real data: what each --tta mode buys (top-1, ECE, NLL) and costs
(images/s), against no TTA, on trained runs and test images they never saw.

    python benchmarks/tta.py digits=/tmp/calibration/digits-seed0:/tmp/calibration/digits/data/test \\
        textures=/tmp/calibration/textures-seed0:/tmp/calibration/textures/data/test --rounds 3
    # a markdown table on stdout; --json FILE keeps every figure

Each mode is evaluated `--rounds` times in turn (none, flip, crops, flip+crops, then again), and
the median images/s is reported: the machine's noise hits every mode alike. A mode a run refuses
(mirrored views for a run trained without flips) is reported as refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

MODES = (None, "flip", "crops", "flip+crops")


def main() -> int:
    from imgrec.engine.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN:TEST")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        run, _, test = rest.partition(":")
        figures: dict = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                if isinstance(figures[mode], str):  # refused in an earlier round
                    continue
                try:
                    figures[mode].append(evaluate(run, test, tta=mode, workers=0))
                except ValueError as exc:
                    figures[mode] = str(exc)
        base_rate = statistics.median(m["images_per_s"] for m in figures[None])
        for mode in MODES:
            if isinstance(figures[mode], str):
                rows.append({"dataset": name, "tta": mode, "refused": figures[mode]})
                continue
            first = figures[mode][0]
            rate = statistics.median(m["images_per_s"] for m in figures[mode])
            rows.append({"dataset": name, "tta": mode or "none", "images": first["n"], "top1": first["top1"], "ece": first["ece"], "nll": first["nll"],
                         "images_per_s": rate, "cost": base_rate / rate})  # fmt: skip
        print(json.dumps(rows[-4:]), file=sys.stderr, flush=True)
    print("| dataset | --tta | top-1 % | ECE % | NLL | images/s | time vs none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['dataset']} | {r['tta']} | refused: trained without flips | | | | |")
        else:
            print(f"| {r['dataset']} | {r['tta']} | {r['top1']:.2f} | {r['ece']:.2f} | {r['nll']:.4f} | {r['images_per_s']:.0f} | {r['cost']:.1f}x |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
