"""The demo end to end at a tiny size, and the train command's config precedence (YAML < flags)."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from rich.console import Console

import imgrec
from imgrec.cli import build_parser
from imgrec.cli.training import train_config_from_args
from imgrec.data.synth import SynthSpec
from imgrec.demo import DEMO_RECIPE, demo_dataset, run_demo


def test_demo_writes_report_metrics_and_model(tmp_path):
    spec = SynthSpec(classes=3, train_per_class=12, val_per_class=4, seed=0, min_side=48, max_side=64, clutter=0.0)
    console = Console(file=io.StringIO(), width=200)
    report = run_demo(tmp_path / "demo", epochs=1, spec=spec, console=console)
    run = report.parent
    assert report == run / "report.html" and report.stat().st_size > 10_000
    html = report.read_text(encoding="utf-8")
    predictions, mistakes = html.split("<h2>The most confident mistakes</h2>")
    assert predictions.count('class="pred ') == 3 * 2  # two val images of each class, predicted
    wrong = [line for line in mistakes.splitlines() if 'class="pred wrong"' in line]
    assert 1 <= len(wrong) <= 8 and len(wrong) == mistakes.count('class="pred ')  # one epoch leaves mistakes; only wrong answers shown
    assert len(list((run / "explain").glob("*.png"))) == len(wrong)  # each with its heatmap
    assert "<h2>Calibration</h2>" in predictions and (run / "reliability.png").is_file()
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["n"] == 12 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    info = json.loads((run / "model.json").read_text())
    assert info["architecture"] == DEMO_RECIPE["model"] and info["classes"] == ["circle", "square", "triangle"]
    assert (run / "confusion.png").is_file()
    assert f"Report: {report}" in console.file.getvalue()

    # A second demo reuses the cached dataset and starts a fresh run (one metrics row, not two).
    stamp = (run / "data" / "imgrec-synth.json").stat().st_mtime_ns
    run_demo(run, epochs=1, spec=spec, console=console)
    assert (run / "data" / "imgrec-synth.json").stat().st_mtime_ns == stamp
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_demo_dataset_is_rewritten_when_the_spec_changes(tmp_path):
    small = SynthSpec(classes=2, train_per_class=2, val_per_class=1, min_side=32, max_side=32)
    folder = demo_dataset(tmp_path / "data", small)
    assert len(list((folder / "train").rglob("*.jpg"))) == 4
    demo_dataset(folder, SynthSpec(classes=3, train_per_class=2, val_per_class=1, min_side=32, max_side=32))
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["circle", "square", "triangle"]


def test_train_flags_win_over_the_yaml_config(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"epochs": 3, "batch_size": 4, "opt": "sgd", "data_config": {"img_size": 32, "hflip": 0.0}}))
    args = build_parser().parse_args(["train", "--config", str(recipe), "--data", "DATA", "--batch-size", "8", "--img-size", "48"])
    config = train_config_from_args(args)
    assert (config.data, config.epochs, config.batch_size, config.opt) == ("DATA", 3, 8, "sgd")
    assert config.data_config == {"img_size": 48, "hflip": 0.0}
    assert config.model == "resnet50" and config.lr is None  # untouched defaults


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nbatchsize: 4\n")
    args = build_parser().parse_args(["train", "--config", str(recipe), "--data", "DATA"])
    with pytest.raises(ValueError, match=r"batchsize.*batch_size"):
        train_config_from_args(args)


def test_public_api_names():
    from imgrec.engine.evaluate import evaluate
    from imgrec.engine.tasks.classify import train
    from imgrec.inference.predict import load

    assert imgrec.train is train and imgrec.load is load and imgrec.evaluate is evaluate
    missing = [name for name in imgrec.__all__ if name != "__version__" and getattr(imgrec, name, None) is None]
    assert not missing, f"names of the public API that do not resolve: {missing}"
