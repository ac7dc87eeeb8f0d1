"""How long ``imgrec --help`` and each command's ``--help`` take, as a user types them.

Each command line runs as a fresh process (the console script of the virtual environment), the
commands interleaved, ``--runs`` times; the table shows the median wall time and the slowest
run, beside a bare ``python -c pass`` (the interpreter's own start-up). The target is under a
second for every line.

    python benchmarks/cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("", "train", "pretrain", "probe", "evaluate", "predict", "export", "benchmark", "serve", "synth", "verify", "inspect", "models", "shards", "demo")


def imgrec_executable() -> list[str]:
    script = Path(sys.executable).with_name("imgrec")
    if script.is_file():
        return [str(script)]
    found = shutil.which("imgrec")
    return [found] if found else [sys.executable, "-m", "imgrec"]


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    imgrec = imgrec_executable()
    lines = {"python -c pass": [sys.executable, "-c", "pass"]}
    lines.update({f"imgrec {c} --help".replace("  ", " "): [*imgrec, *([c] if c else []), "--help"] for c in COMMANDS})
    times: dict[str, list[float]] = {name: [] for name in lines}
    for _ in range(args.runs):
        for name, command in lines.items():
            times[name].append(wall(command))
    print(f"wall seconds over {args.runs} runs (median, slowest)")
    for name, values in times.items():
        print(f"{name:28s} {statistics.median(values):6.3f} {max(values):6.3f}")
    slowest = max(statistics.median(v) for name, v in times.items() if name.startswith("imgrec"))
    print(f"slowest imgrec median: {slowest:.3f} s (target < 1 s: {'met' if slowest < 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
