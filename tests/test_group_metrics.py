"""Figures per group of images (``evaluate --groups``): top-1, ECE and per-class recall of each
group and the largest gaps, against a hand computation, through the command and in the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from imgrec.engine.evaluate import group_metrics


def logits_for(confidences_and_predictions: list[tuple[float, int]]) -> torch.Tensor:
    """Two-class logits whose softmax gives class ``p`` probability ``c``."""
    rows = []
    for confidence, predicted in confidences_and_predictions:
        margin = math.log(confidence / (1 - confidence))
        rows.append([margin, 0.0] if predicted == 0 else [0.0, margin])
    return torch.tensor(rows, dtype=torch.float64)


def test_each_group_and_the_gaps_match_a_hand_computation() -> None:
    # group A: 4 images, all right; group B: 2 dog images, 1 right; one image without a group
    logits = logits_for([(0.9, 0), (0.9, 0), (0.8, 1), (0.8, 1), (0.6, 0), (0.6, 1), (0.7, 1)])
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 0])
    groups = ["A", "A", "A", "A", "B", "B", None]
    result = group_metrics(logits, labels, ["cat", "dog"], groups)
    a, b = result["groups"]
    assert (a["group"], a["n"], a["top1"]) == ("A", 4, 100.0) and (b["group"], b["n"], b["top1"]) == ("B", 2, 50.0)
    assert a["recall"] == {"cat": 100.0, "dog": 100.0} and b["recall"] == {"dog": 50.0}  # no cat in B: no recall there
    # ECE by hand, 15 bins: A: 2/4 * |1 - 0.9| + 2/4 * |1 - 0.8| = 0.15; B: both at 0.6, one right: |0.5 - 0.6| = 0.1
    assert a["ece"] == pytest.approx(15.0) and b["ece"] == pytest.approx(10.0)
    gaps = result["gaps"]
    assert gaps["top1"] == {"gap": 50.0, "highest": "A", "lowest": "B"}
    assert gaps["ece"]["gap"] == pytest.approx(5.0) and (gaps["ece"]["highest"], gaps["ece"]["lowest"]) == ("A", "B")
    assert gaps["recall"] == {"class": "dog", "gap": 50.0, "highest": "A", "lowest": "B"}
    assert result["ungrouped"] == 1


def test_one_group_has_no_gaps() -> None:
    result = group_metrics(logits_for([(0.9, 0), (0.8, 1)]), torch.tensor([0, 1]), ["cat", "dog"], ["x", "x"])
    assert result["gaps"] == {} and result["groups"][0]["top1"] == 100.0


def test_evaluate_groups_through_the_command_and_the_report(run_dir, tmp_path, capsys) -> None:
    from imgrec.cli import main
    from imgrec.report import write_report

    data = run_dir.parent / "data"
    val = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    lines = ["filename,group"] + [f"{p.relative_to(data / 'val').as_posix()},{'site-' + str(i % 2)}" for i, p in enumerate(val[:-1])]
    (tmp_path / "groups.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run_dir), "--data", str(data), "--groups", str(tmp_path / "groups.csv"), "--json", str(out), "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    fairness = json.loads(out.read_text())["fairness"]
    assert [g["group"] for g in fairness["groups"]] == ["site-0", "site-1"] and sum(g["n"] for g in fairness["groups"]) == len(val) - 1
    assert fairness["ungrouped"] == 1 and "1 image(s) have no group" in printed and "largest gaps between groups: top-1" in printed
    metrics = json.loads(out.read_text())
    page = write_report(tmp_path / "r.html", title="t", history=[], metrics=metrics, predictions=[]).read_text()
    assert "<h2>Groups</h2>" in page and "site-1" in page and "Largest gaps between groups: top-1" in page
    (tmp_path / "bad.csv").write_text("image,group\nnothere.png,site-0\n")
    assert main(["evaluate", str(run_dir), "--data", str(data), "--groups", str(tmp_path / "bad.csv"), "--device", "cpu", "--workers", "0"]) == 2
    assert "line 2: image 'nothere.png' not found" in capsys.readouterr().err
    windows = "image_path,group\n" + "\n".join(f"{p.relative_to(data / 'val').as_posix().replace('/', chr(92))},all" for p in val) + "\n"
    (tmp_path / "windows.csv").write_text(windows)  # backslashes, and a header of any name
    assert main(["evaluate", str(run_dir), "--data", str(data), "--groups", str(tmp_path / "windows.csv"), "--json", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert json.loads(out.read_text())["fairness"]["groups"][0]["n"] == len(val)
    assert main(["evaluate", str(run_dir), "--data", str(data), "--groups", str(tmp_path / "none.csv"), "--device", "cpu"]) == 2
    assert "--groups" in capsys.readouterr().err
