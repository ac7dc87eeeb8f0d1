"""How the range test's suggestion (``imgrec lr-find``) compares with the recipe's rate, on small real
datasets: for each, the range test on the run imgrec would start (its recipe's batch, model and
data), and two readings of the same curve: imgrec's (a tenth of the rate at the lowest smoothed
loss, fastai's ``lr_min``) and the other common one, half-way down the curve's longest descent
("valley"). The recipe's peak rate is printed beside them; ``recipe_study.py``'s ``lr-*`` and
``lr-auto`` variants train at each.

    python benchmarks/lr_suggestions.py [--datasets sklearn-digits ...] [--model resnet18] [--root /tmp/real_datasets]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_datasets import build  # noqa: E402


def valley(lrs: list[float], losses: list[float]) -> float:
    """The rate half-way along the longest run of steps over which the smoothed loss keeps falling."""
    best_start, best_length, start = 0, 0, 0
    for i in range(1, len(losses) + 1):
        if i == len(losses) or losses[i] >= losses[i - 1]:
            if i - 1 - start > best_length:
                best_start, best_length = start, i - 1 - start
            start = i
    return lrs[best_start + best_length // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sklearn-digits", "opencv-digits", "fashion-mnist", "skimage-textures"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--root", type=Path, default=Path("/tmp/real_datasets"))
    args = parser.parse_args()

    from rich.console import Console

    from imgrec.engine.tasks.classify import lr_find

    print("| dataset | batch | recipe's peak lr | range test: lr_min / 10 (imgrec) | valley |")
    print("|---|---|---|---|---|")
    for name in args.datasets:
        data = args.root / name
        build(name, data)
        with tempfile.TemporaryDirectory() as tmp:
            console = Console(file=io.StringIO(), width=200)
            test = lr_find(data=str(data), model=args.model, epochs=args.epochs, out=f"{tmp}/run", tensorboard=False, console=console)
            config = (Path(tmp) / "run" / "config.yaml").read_text() if (Path(tmp) / "run" / "config.yaml").exists() else ""
        batch = next((line.split(":")[1].strip() for line in config.splitlines() if line.startswith("batch_size:")), "?")
        base = next((float(line.split(":")[1]) for line in config.splitlines() if line.startswith("base_lr:")), None)
        peak = f"{base * int(batch) / 256:.3g}" if base is not None and batch.isdigit() else "?"
        print(f"| {name} | {batch} | {peak} | {test.suggestion:.3g} | {valley(test.lrs, test.losses):.3g} |", flush=True)


if __name__ == "__main__":
    main()
