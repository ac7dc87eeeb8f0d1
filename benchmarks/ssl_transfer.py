"""Does self-supervised pretraining help? Probes and few-label fine-tuning vs a random init.

For each method, ``imgrec pretrain`` runs on the train split without its labels; then, for a
randomly initialised backbone and for each pretrained one:
  * linear-probe and kNN top-1 of the frozen features on the val split (``imgrec probe``),
  * fine-tuning top-1 with 10% of the labels (``imgrec train --train-fraction 0.1``), the same
    recipe and epochs for every starting point, at the last epoch, median over ``--seeds``
    label draws.
Everything goes through the public API, the same code the CLI runs. Prints one table and writes
``OUT/ssl_transfer.json``.

    python benchmarks/ssl_transfer.py [--data DIR] [--methods simclr moco byol] [--pretrain-epochs 40] [--finetune-epochs 20]

Without ``--data`` it writes the benchmark's dataset once: ``imgrec synth`` shapes without
clutter and with a flat background colour (``--clutter 0 --background 0``), 3,000 train and
600 val images, 96-128 px. See BENCHMARKS.md for why the flat background.

**Small real data** (``--real NAME=ROOT[@SIZE] ...``, roots from ``benchmarks/real_datasets.py``):
what a user with a few thousand unlabelled images gets from each method with its defaults (the
recipe picks batch, optimizer, rate, crops, teacher momentum; ``@SIZE`` fixes the input size for
every row, the only setting given), at most 20 epochs. Besides random init and the methods it
measures weights trained on another dataset (``--other ROOT``: a supervised resnet run there),
as they are, continued with DINO on the target's images (``--pretrained``), and a resnet18
trained there distilled into the benchmark's model (``--method distill --teacher``), as is a
larger model pretrained with DINO on the target's images (``DEPLOY_TEACHER``: the deployment
case). Every start runs at ``--seeds`` seeds (default 3; the teachers at seed 0 only): seed s
pretrains with seed s (the random init is drawn with it), probes it (linear and kNN; the seed
draws the linear probe's batches and held-out fifth) and fine-tunes it on a 10% draw of the
labels made with seed s, with ``imgrec train``'s defaults; the table gives each measure's median.

    python benchmarks/ssl_transfer.py --real fashion=/tmp/real/fashion-mnist photos=/tmp/real/skimage-photos@64 --other /tmp/real/opencv-digits
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console

from imgrec.data.synth import SynthSpec
from imgrec.demo import demo_dataset
from imgrec.engine.probe import probe
from imgrec.engine.tasks.classify import train
from imgrec.engine.tasks.pretrain import pretrain

BENCH_DATA = SynthSpec(classes=10, train_per_class=300, val_per_class=60, seed=0, min_side=96, max_side=128, clutter=0.0, background=0.0)
IMAGE = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear"}

# One table of hyperparameters (airbench's habit). The paper recipes are for ImageNet batches of
# 4,096 on accelerators; at 3,000 images, batch 64 and two CPU cores, AdamW converges where
# LARS with the paper's trust coefficient barely moves in the few hundred steps there are.
PRETRAIN = {
    "simclr": {"opt": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "temperature": 0.2},
    "moco": {"opt": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "temperature": 0.2, "teacher_momentum": 0.99},
    "byol": {"opt": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "teacher_momentum": 0.99},
}
PRETRAIN_COMMON = {"batch_size": 64, "warmup_epochs": 2, "proj_hidden_dim": 512, "knn_every": 5, "tensorboard": False}
DEPLOY_TEACHER = ("resnet26t", "dino")  # the deployment case's teacher: architecture, pretraining method
FINETUNE = {"epochs": 20, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 2, "label_smoothing": 0.1, "tensorboard": False}


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_epoch(run: Path) -> int:
    """The last epoch the run logged (0 for none)."""
    rows = metrics(run)
    return rows[-1]["epoch"] if rows else 0


REAL_METHODS = ("simclr", "moco", "byol", "dino")


def run_once(run: Path, epochs: int, start, console: Console, *, resume=pretrain) -> float:
    """``start()`` into ``run`` unless it already logged ``epochs`` epochs (an interrupted one is
    finished with ``resume``: ``pretrain`` or ``train``); seconds spent."""
    t0 = time.perf_counter()
    if last_epoch(run) != epochs:
        if (run / "last.pt").is_file():
            resume(resume=run, console=console)
        else:
            shutil.rmtree(run, ignore_errors=True)
            start()
    return round(time.perf_counter() - t0, 1)


REAL_ROWS = (*REAL_METHODS, "continued", "distill")  # --rows: the methods, continued pretraining, the two distillation rows


def small_real(args: argparse.Namespace, console: Console) -> None:
    """The small-real-data table: every start (of ``--rows``) on every ``--real`` dataset."""
    out, model, epochs = Path(args.out), args.model, args.pretrain_epochs
    rows = set(args.rows)
    seconds: dict[str, float | list[float]] = {}  # the other weights: one figure; each dataset's rows: one per run
    # Weights made on another dataset: the benchmark's architecture (continued pretraining starts
    # from them) and a larger teacher (distilled from), both supervised with imgrec's defaults.
    weights, teacher = out / f"other-{model}", out / "other-teacher-resnet18"
    other_runs = [(run, arch) for run, arch, row in ((weights, model, "continued"), (teacher, "resnet18", "distill")) if row in rows]
    for run, arch in other_runs:
        seconds[run.name] = run_once(run, epochs, lambda run=run, arch=arch: train(data=args.other, model=arch, out=str(run), epochs=epochs, tensorboard=False, console=console), console, resume=train)
    results: dict[str, dict] = {}
    for spec in args.real:
        name, _, rest = spec.partition("=")
        root, _, size = rest.partition("@")
        image = {"img_size": int(size)} if size else {}
        base = out / name
        # label -> one start per seed (a teacher: its one run); the random init is drawn per seed.
        starts: dict[str, list[str]] = {"random": [f"random:{model}"] * args.seeds}
        common = {"data": root, "model": model, "epochs": epochs, "knn_every": 0, "tensorboard": False, "console": console, "data_config": image}
        plans = {m: {"method": m} for m in REAL_METHODS if m in rows}
        if "continued" in rows:
            starts[f"weights from {Path(args.other).name}"] = [str(weights)] * args.seeds
            plans["dino, continued"] = {"method": "dino", "pretrained": str(weights)}
        if "distill" in rows:
            starts[f"teacher {teacher.name}"] = [str(teacher)]
            plans["distill"] = {"method": "distill", "teacher": str(teacher)}
            # The deployment case: a larger model pretrained on the same images, distilled into the small one.
            arch, how = DEPLOY_TEACHER
            big, label = base / f"teacher-{arch}-{how}", f"teacher {arch} {how} here"
            seconds[f"{name}/{label}"] = [run_once(
                big, epochs, lambda big=big, common=common: pretrain(out=str(big), **{**common, "model": arch}, method=how), console
            )]
            starts[label] = [str(big)]
            plans["distill from it"] = {"method": "distill", "teacher": str(big)}
        for label, plan in plans.items():
            starts[label] = []
            for seed in range(args.seeds):
                run = base / f"pretrain-{label.replace(', ', '-').replace(' ', '-')}-seed{seed}"
                job = lambda run=run, plan=plan, common=common, seed=seed: pretrain(out=str(run), seed=seed, **common, **plan)  # noqa: E731
                spent = run_once(run, epochs, job, console)
                seconds.setdefault(f"{name}/{label}", []).append(spent)
                starts[label].append(str(run))
        # Probes see what each start was trained at; random init and the other weights get the benchmark's size.
        probe_config = {"crop_pct": 1.0, **image} if image else {"crop_pct": 1.0, "img_size": train_size(Path(starts[next(iter(plans))][0]))}
        table = {}
        for label, runs in starts.items():
            row: dict = {f"{kind}_runs": [] for kind in ("linear", "knn", "finetune")}
            for seed, start in enumerate(runs):
                for kind in ("linear", "knn"):
                    found = probe(start, root, method=kind, seed=seed, data_config=probe_config, cache=base / "features")
                    row[f"{kind}_runs"].append(found["top1"])
                if label.startswith("teacher"):
                    continue
                run = base / f"finetune-{label.replace(', ', '-').replace(' ', '-')}-seed{seed}"
                pretrained = None if label == "random" else start
                run_once(run, args.finetune_epochs, lambda run=run, seed=seed, pretrained=pretrained, root=root, image=image: train(
                    data=root, model=model, out=str(run), pretrained=pretrained, train_fraction=args.fraction, seed=seed,
                    epochs=args.finetune_epochs, tensorboard=False, console=console, data_config=dict(image),
                ), console, resume=train)  # fmt: skip
                row["finetune_runs"].append(metrics(run)[-1]["val_top1"])
            medians = {kind: statistics.median(row[f"{kind}_runs"]) for kind in ("linear", "knn", "finetune") if row[f"{kind}_runs"]}
            table[label] = {**medians, **row}
        results[name] = table
        console.print(f"\n{name} ({root}), {model}, pretraining {epochs} epochs with defaults; fine-tuning {args.fraction:.0%} of the labels, {args.finetune_epochs} epochs; medians of {args.seeds} seeds")
        console.print(f"{'start':<34} {'linear':>8} {'kNN':>8} {'fine-tune':>10} {'seconds':>8}")
        for label, row in table.items():
            tuned = f"{row['finetune']:>10.2f}" if "finetune" in row else f"{'-':>10}"
            spent = statistics.median(seconds.get(f"{name}/{label}", [0]))
            console.print(f"{label:<34} {row['linear']:>8.2f} {row['knn']:>8.2f} {tuned} {spent:>8.0f}")
        methods = [m for m in REAL_METHODS if m in table]
        if methods:
            best = max(methods, key=lambda m: table[m]["linear"])
            gain = table[best]["linear"] - table["random"]["linear"]
            console.print(f"best method {best}: linear {gain:+.2f} points over the random init's median")
    summary = {"results": results, "seconds": seconds, "args": vars(args)}
    (out / "ssl_small_real.json").write_text(json.dumps(summary, indent=2) + "\n")


def train_size(run: Path) -> int:
    """The input size a pretraining run was trained at (its card's)."""
    return int(json.loads((run / "backbone.json").read_text())["img_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset root with train/ and val/ (default: the benchmark's synth variant, written once)")
    parser.add_argument("--out", default="runs/ssl_transfer")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco", "byol"])
    parser.add_argument("--pretrain-epochs", type=int, help="default 40; with --real 20, the small-real-data table's bound")
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE["epochs"])
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction of the train labels for fine-tuning")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning's label draws (median reported); with --real, every start's seeds: pretraining, random init, probes and label draws")
    parser.add_argument("--real", nargs="+", metavar="NAME=ROOT[@SIZE]", help="the small-real-data table on these datasets instead")
    parser.add_argument("--other", help="--real: the dataset the 'other' weights and the distillation teacher are trained on")
    parser.add_argument("--rows", nargs="+", choices=REAL_ROWS, default=list(REAL_ROWS), help="--real: the rows to run (default all; continued and distill need --other)")
    args = parser.parse_args()
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 20 if args.real else 40

    console = Console(soft_wrap=True)
    if args.real:
        if not args.other and {"continued", "distill"} & set(args.rows):
            parser.error("--rows continued and distill need --other ROOT (the dataset other weights are trained on)")
        small_real(args, console)
        return
    out = Path(args.out)
    data = Path(args.data) if args.data else demo_dataset(out / "data", BENCH_DATA, console)
    started = time.perf_counter()
    starts = {"random": f"random:{args.model}"}
    pretrain_seconds = {}
    for method in args.methods:
        run = out / f"pretrain-{method}"
        if last_epoch(run) != args.pretrain_epochs:
            t0 = time.perf_counter()
            if (run / "last.pt").is_file():  # an interrupted benchmark: finish the run, do not mistake it for done
                pretrain(resume=run, console=console)
            else:
                shutil.rmtree(run, ignore_errors=True)
                pretrain(
                    data=str(data), model=args.model, method=method, out=str(run), epochs=args.pretrain_epochs,
                    data_config={**IMAGE, "scale": (0.2, 1.0)}, console=console, **PRETRAIN_COMMON, **PRETRAIN[method],
                )  # fmt: skip
            pretrain_seconds[method] = round(time.perf_counter() - t0, 1)
        starts[method] = str(run)

    results = {}
    for name, start in starts.items():
        row = {}
        for kind in ("linear", "knn"):
            row[kind] = probe(start, data, method=kind, data_config=IMAGE, cache=out / "features")["top1"]
        finetuned = []
        for seed in range(args.seeds):
            run = out / f"finetune-{name}-seed{seed}"
            if last_epoch(run) != args.finetune_epochs:
                if (run / "last.pt").is_file():
                    train(resume=run, console=console)
                else:
                    shutil.rmtree(run, ignore_errors=True)
                    train(
                        data=str(data), model=args.model, out=str(run), pretrained=None if name == "random" else start,
                        train_fraction=args.fraction, seed=seed, data_config={**IMAGE, "scale": (0.35, 1.0)},
                        console=console, **{**FINETUNE, "epochs": args.finetune_epochs},
                    )  # fmt: skip
            # The last epoch's val top-1, not the best one: picking the epoch on val would flatter every row.
            finetuned.append(metrics(run)[-1]["val_top1"])
        row["finetune"] = statistics.median(finetuned)
        row["finetune_runs"] = finetuned
        results[name] = row

    console.print(f"\n{args.model}, {data}; pretraining {args.pretrain_epochs} epochs; fine-tuning on {args.fraction:.0%} of the labels, {args.finetune_epochs} epochs, median of {args.seeds}")
    console.print(f"{'start':<10} {'linear top-1':>13} {'kNN top-1':>10} {'fine-tune top-1':>16}")
    for name, row in results.items():
        console.print(f"{name:<10} {row['linear']:>13.2f} {row['knn']:>10.2f} {row['finetune']:>16.2f}")
    for method in args.methods:
        gain = {k: results[method][k] - results["random"][k] for k in ("linear", "knn", "finetune")}
        console.print(f"{method} - random: linear {gain['linear']:+.2f}, kNN {gain['knn']:+.2f}, fine-tune {gain['finetune']:+.2f} points")
    total = round(time.perf_counter() - started, 1)
    console.print(f"wall time {total} s (pretraining: {pretrain_seconds})")
    summary = {"results": results, "pretrain_seconds": pretrain_seconds, "seconds": total, "args": vars(args), "pretrain": PRETRAIN, "finetune": FINETUNE}
    (out / "ssl_transfer.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
