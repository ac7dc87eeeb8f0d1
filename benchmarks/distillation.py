"""Knowledge distillation on real data: a small student against its large teacher, in accuracy
and in inference speed.

For each dataset (``NAME=ROOT``, roots from ``benchmarks/real_datasets.py``): the teacher
(``--teacher-model``, default resnet50) is trained once with ``imgrec train``'s defaults; the
student (``--student-model``, default resnet10t) is trained with the same defaults alone and
with ``--teacher`` (the default weight and temperature, or ``--kd`` settings), for ``--seeds``
seeds each (val top-1 of the saved model, median); with ``--unlabelled DIR`` a third student
also learns from those images through the teacher. Then ``imgrec benchmark`` times teacher and
student on the CPU backends (``--backends``) and the table gives each one's fastest backend with
at least 99% top-1 agreement, and the speed ratio there.

    python benchmarks/distillation.py fashion=/tmp/real_datasets/fashion-mnist --out /tmp/kd --epochs 20
    # a markdown table on stdout; OUT/distillation.json keeps every figure
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

from rich.console import Console


def trained(out: Path, console: Console, **options) -> tuple[float, float]:
    """(val top-1 of the saved model, seconds): the run in ``out``, trained now unless it is there already."""
    from imgrec.engine.tasks.classify import train

    if not (out / "model.json").is_file():
        started = time.perf_counter()
        train(out=str(out), console=console, tensorboard=False, **options)
        (out / "seconds").write_text(f"{time.perf_counter() - started:.1f}")
    card = json.loads((out / "model.json").read_text())
    return float(card["top1"]), float((out / "seconds").read_text())


def fastest(run: Path, backends: tuple[str, ...], images: Path) -> dict:
    """The fastest backend with >= 99% agreement in ``imgrec benchmark RUN``, and every row."""
    from imgrec.inference.benchmark import benchmark

    results = benchmark(run, backends=backends, batch=32, iterations=30, seconds=8.0, images=images, console=Console(file=io.StringIO()))
    rows = [r.__dict__ for r in results]
    usable = [r for r in rows if r["images_per_s"] and (r["top1_agreement"] or 0) >= 99.0]
    best = max(usable, key=lambda r: r["images_per_s"])
    return {"best": best, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", metavar="NAME=ROOT")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher-model", default="resnet50")
    parser.add_argument("--student-model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kd", default="", help="JSON of train options for the distilled student, e.g. '{\"kd_weight\": 0.9}'")
    parser.add_argument("--unlabelled", type=Path, help="a folder of extra unlabelled images for a third student")
    parser.add_argument("--backends", default="eager,bf16,onnx-int8,openvino-int8")
    parser.add_argument("--img-size", type=int, help="fix the input size of every run (default: the recipe's)")
    args = parser.parse_args()
    console = Console(file=io.StringIO())
    kd = json.loads(args.kd) if args.kd else {}
    common = {"epochs": args.epochs, "workers": 2}
    if args.img_size:
        common["data_config"] = {"img_size": args.img_size}
    summary = []
    for spec in args.datasets:
        name, _, root = spec.partition("=")
        base = args.out / name
        teacher_top1, teacher_s = trained(base / "teacher", console, data=root, model=args.teacher_model, seed=0, **common)
        row = {"dataset": name, "teacher": args.teacher_model, "teacher_top1": teacher_top1, "teacher_seconds": teacher_s, "student": args.student_model}
        kinds = {"alone": {}, "distilled": {"teacher": str(base / "teacher"), **kd}}
        if args.unlabelled:
            kinds["distilled+unlabelled"] = {"teacher": str(base / "teacher"), "unlabelled": str(args.unlabelled), **kd}
        for kind, extra in kinds.items():
            figures = [trained(base / f"{kind}-seed{seed}", console, data=root, model=args.student_model, seed=seed, **common, **extra) for seed in range(args.seeds)]
            row[kind] = {"top1": [f[0] for f in figures], "median_top1": statistics.median(f[0] for f in figures), "seconds": [f[1] for f in figures]}
            print(f"{name} {kind}: {row[kind]['top1']}", flush=True)
        backends = tuple(args.backends.split(","))
        val = Path(root) / "val"
        row["teacher_speed"] = fastest(base / "teacher", backends, val)
        row["student_speed"] = fastest(base / "distilled-seed0", backends, val)
        row["speedup"] = row["student_speed"]["best"]["images_per_s"] / row["teacher_speed"]["best"]["images_per_s"]
        summary.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distillation.json").write_text(json.dumps(summary, indent=2))
    print("| data | teacher top-1 | student alone | distilled | distilled + unlabelled | teacher fastest | student fastest | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary:
        t, s = r["teacher_speed"]["best"], r["student_speed"]["best"]
        extra = f"{r['distilled+unlabelled']['median_top1']:.2f}" if "distilled+unlabelled" in r else "-"
        print(
            f"| {r['dataset']} | {r['teacher_top1']:.2f} ({r['teacher']}) | {r['alone']['median_top1']:.2f} | {r['distilled']['median_top1']:.2f} | {extra} | "
            f"{t['backend']} {t['images_per_s']:.0f} img/s | {s['backend']} {s['images_per_s']:.0f} img/s | {r['speedup']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
