"""Does the fast eval pipeline change a model's accuracy? Top-1 with imgrec's decode-and-crop vs
torchvision's standard eval transform, same model, same images.

The model is the demo's (``runs/demo``, trained by ``make demo``; trained here if missing). The
images are a fresh draw of the demo's shapes (another seed), at 96-512 px so that the fast
pipeline decodes many of them at a DCT scale of 1/2 or 1/4 (the model looks at 64 px), plus
the demo's own val set. Target: top-1 within 0.3 points.

    python benchmarks/eval_parity.py [--run runs/demo] [--images-per-class 300]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace
from pathlib import Path

from imgrec.data.folder import iter_image_files
from imgrec.data.synth import write_synth_dataset
from imgrec.demo import DEMO_DATA, run_demo
from imgrec.engine.evaluate import evaluate
from imgrec.inference.predict import load


def agreement(run: Path, folder: Path) -> float:
    """Share of images whose top-1 class is the same with both pipelines."""
    paths = [p for name in sorted(d.name for d in folder.iterdir() if d.is_dir()) for p in iter_image_files(folder / name)]
    fast = [p.label for p in load(run, loader="fast").predict(paths, topk=1, batch_size=64)]
    standard = [p.label for p in load(run, loader="standard").predict(paths, topk=1, batch_size=64)]
    return sum(a == b for a, b in zip(fast, standard)) / len(paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="model directory (trained with the demo recipe if missing)")
    parser.add_argument("--data", default="runs/bench/parity_data", help="where the large-image val set is cached")
    parser.add_argument("--images-per-class", type=int, default=300)
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "model.json").is_file():
        run_demo(run)
    spec = replace(DEMO_DATA, seed=1, train_per_class=1, val_per_class=args.images_per_class, min_side=96, max_side=512)
    data = Path(args.data)
    if not (data / "val").is_dir():
        write_synth_dataset(data, spec)
    sets = {"demo val (96-128 px)": run / "data" / "val", "fresh shapes, 96-512 px, seed 1": data / "val"}
    print(f"model {run}; {datetime.date.today()}; top-1 %, fast vs standard eval pipeline")
    worst = 0.0
    for name, folder in sets.items():
        if not folder.is_dir():
            continue
        fast = evaluate(run, folder, loader="fast")
        standard = evaluate(run, folder, loader="standard")
        delta = fast["top1"] - standard["top1"]
        worst = max(worst, abs(delta))
        print(f"{name:34s} {fast['n']:6d} images: fast {fast['top1']:.2f}  standard {standard['top1']:.2f}  "
              f"difference {delta:+.2f} points; same top-1 class on {100 * agreement(run, folder):.2f}% of images")  # fmt: skip
    print(f"largest difference {worst:.2f} points (target: within 0.3)")
    return 0 if worst <= 0.3 else 1


if __name__ == "__main__":
    sys.exit(main())
