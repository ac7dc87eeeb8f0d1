"""benchmarks/gpu_check.py stays runnable on a machine without a GPU: its dry run says what it
would measure and writes the plan, and without --dry-run it says there is no CUDA device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_dry_run_names_every_step(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["dry_run"] is True
    assert list(plan["steps"]) == ["environment", "train_files", "train_cached", "inference", "ddp", "resume", "serve"]
    for step, what in plan["steps"].items():
        assert f"| {step} | {what} |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run for real")
def test_without_cuda_it_says_so(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "r.json").exists()
