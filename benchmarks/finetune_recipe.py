"""What the recipe should do when a run starts from pretrained weights: weights we make (a model
trained with the defaults on one real dataset) fine-tuned on others, against training from scratch.

For each target dataset and seed: from scratch (the defaults), fine-tuned with the defaults (the
recipe's fine-tuning rate, x0.25 of the scratch rate, and its short warmup), and fine-tuned at the
scratch rate (x1), at x0.1 of it, and with layer decay 0.75. Best val top-1 and wall time per run;
the table gives the medians over the seeds.

    python benchmarks/finetune_recipe.py [--source fashion-mnist] [--targets sklearn-digits skimage-textures]
        [--epochs 5] [--seeds 0 1 2] [--json finetune.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from real_datasets import build

IMGREC = str(Path(sys.executable).with_name("imgrec"))


def train(data: Path, out: Path, *extra: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([IMGREC, "train", "--data", str(data), "--out", str(out), *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"imgrec train {' '.join(extra)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((out / "config.yaml").read_text())
    return {"best": max(r["val_top1"] for r in rows), "seconds": round(time.perf_counter() - started, 1), "lr": config.get("lr"), "batch": config.get("batch_size")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--targets", nargs="+", default=["sklearn-digits", "skimage-textures"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--source-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("/tmp/real_datasets"))
    parser.add_argument("--json", type=Path, default=Path("finetune_recipe.json"))
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = args.root / args.source
        build(args.source, source)
        weights = work / "source"
        results["source"] = train(source, weights, "--model", args.model, "--epochs", str(args.source_epochs), "--seed", "0")
        print(f"source {args.source}: {results['source']}", flush=True)
        for name in args.targets:
            data = args.root / name
            build(name, data)
            for seed in args.seeds:
                common = ("--model", args.model, "--epochs", str(args.epochs), "--seed", str(seed))
                key = f"{name}|{seed}"
                runs = {"scratch": train(data, work / f"{key}-scratch", *common)}
                runs["finetune"] = train(data, work / f"{key}-ft", *common, "--pretrained", str(weights))
                lr = runs["finetune"]["lr"]
                runs["finetune x1"] = train(data, work / f"{key}-ft1", *common, "--pretrained", str(weights), "--lr", str(lr * 4))
                runs["finetune x0.1"] = train(data, work / f"{key}-ft01", *common, "--pretrained", str(weights), "--lr", str(lr * 0.4))
                runs["finetune, layer decay 0.75"] = train(data, work / f"{key}-ftld", *common, "--pretrained", str(weights), "--layer-decay", "0.75")
                results[key] = runs
                args.json.write_text(json.dumps(results, indent=1))
                print(key, {k: (v["best"], v["seconds"]) for k, v in runs.items()}, flush=True)
    print(f"\n{args.model}, source {args.source} ({args.source_epochs} epochs), fine-tuning {args.epochs} epochs; median over seeds {args.seeds}")
    for name in args.targets:
        line = [name]
        for variant in results[f"{name}|{args.seeds[0]}"]:
            runs = [results[f"{name}|{s}"][variant] for s in args.seeds]
            line.append(f"{variant} {statistics.median(r['best'] for r in runs):.2f}% {statistics.median(r['seconds'] for r in runs):.1f} s")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
