"""Calibration: ECE, NLL and Brier score against hand computations, temperature fitting on a
known miscalibrated toy, and the temperature stored in the card and applied by evaluate, predict,
serve and the report, with top-1 unchanged."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from imgrec.calibration import (
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def two_class_logits(confidences: list[float]) -> torch.Tensor:
    """Logits [N, 2] whose softmax puts probability p on class 0: (log p/(1-p), 0)."""
    return torch.tensor([[math.log(p / (1 - p)), 0.0] for p in confidences], dtype=torch.float64)


def test_ece_nll_and_brier_match_a_hand_computation() -> None:
    # Two images at 95% (one right, one wrong) and two at 70% (both right).
    logits = two_class_logits([0.95, 0.95, 0.7, 0.7])
    labels = torch.tensor([0, 1, 0, 0])
    # Bins of width 1/15: 0.95 lies in (14/15, 1], 0.7 in (10/15, 11/15].
    # ECE = 2/4 * |0.5 - 0.95| + 2/4 * |1.0 - 0.7| = 0.225 + 0.15 = 0.375
    assert expected_calibration_error(logits, labels) == pytest.approx(37.5)
    # Brier: right at 0.95 -> 2 * 0.05^2; wrong at 0.95 -> 2 * 0.95^2; right at 0.7 -> 2 * 0.3^2 (twice)
    assert brier_score(logits, labels) == pytest.approx((2 * 0.05**2 + 2 * 0.95**2 + 2 * 2 * 0.3**2) / 4)
    metrics = calibration_metrics(logits, labels)
    assert metrics["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.05) + 2 * math.log(0.7)) / 4)
    filled = {i: row for i, row in enumerate(metrics["reliability"]) if row["n"]}
    assert set(filled) == {10, 14}
    assert (filled[14]["n"], filled[14]["accuracy"], filled[14]["confidence"]) == (2, 0.5, pytest.approx(0.95))
    assert (filled[10]["n"], filled[10]["accuracy"], filled[10]["confidence"]) == (2, 1.0, pytest.approx(0.7))
    assert sum(row["n"] for row in metrics["reliability"]) == 4 and len(metrics["reliability"]) == 15


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin() -> None:
    # 0.8 = 12/15 exactly: bins are (lower, upper], so it belongs to (11/15, 12/15], index 11.
    rows = reliability_bins(two_class_logits([0.8]), torch.tensor([0]))
    assert [i for i, row in enumerate(rows) if row["n"]] == [11]


def test_temperature_fitting_undoes_known_overconfidence_and_keeps_every_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator).squeeze(1)  # drawn from the true probabilities
    overconfident = true_logits * 3.0  # a model 3x too sure: the right temperature is 3
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before, after = calibration_metrics(overconfident, labels), calibration_metrics(overconfident / temperature, labels)
    assert after["nll"] < before["nll"] - 0.1 and after["ece"] < before["ece"] / 2
    assert torch.equal((overconfident / temperature).argmax(dim=1), overconfident.argmax(dim=1))


def test_a_calibrated_model_keeps_temperature_one() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 5, generator=generator)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


@pytest.fixture(scope="module")
def calibrated_run(run_dir, tmp_path_factory):
    """A copy of the shared run, calibrated through the CLI on its train folder (its val holds
    36 images, below the 50 a temperature needs)."""
    from imgrec.cli import main

    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(run_dir, run)
    data = run_dir.parent / "data"
    assert main(["calibrate", str(run), "--data", str(data / "train"), "--device", "cpu", "--precision", "fp32", "--workers", "0"]) == 0
    return run, data


def test_calibrate_stores_the_temperature_and_what_it_did(calibrated_run) -> None:
    run, data = calibrated_run
    card = json.loads((run / "model.json").read_text())
    assert card["temperature"] > 0 and card["temperature"] != 1.0
    calibration = card["calibration"]
    assert calibration["images"] == 72 and calibration["data"] == str(data / "train")
    assert calibration["nll_after"] < calibration["nll_before"]


def test_evaluate_applies_the_temperature_and_top1_does_not_move(calibrated_run, run_dir, tmp_path) -> None:
    from imgrec.engine.evaluate import evaluate

    run, data = calibrated_run
    options = {"device": "cpu", "precision": "fp32", "workers": 0}
    raw = evaluate(run_dir, data / "train", **options)
    calibrated = evaluate(run, data / "train", reliability_png=tmp_path / "reliability.png", **options)
    temperature = json.loads((run / "model.json").read_text())["temperature"]
    assert raw["temperature"] is None and calibrated["temperature"] == temperature
    assert calibrated["top1"] == raw["top1"] and calibrated["confusion"] == raw["confusion"]
    assert calibrated["nll"] < raw["nll"] and calibrated["loss"] == pytest.approx(calibrated["nll"], rel=1e-4)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_and_serve_give_the_calibrated_probabilities(calibrated_run, run_dir) -> None:
    from starlette.testclient import TestClient

    from imgrec.data.decode import load_sample
    from imgrec.inference.predict import load
    from imgrec.serve.app import create_app

    run, data = calibrated_run
    images = sorted((data / "val").rglob("*.png"))[:4] or sorted((data / "val").rglob("*.*"))[:4]
    raw, calibrated = load(run_dir, device="cpu", backend="eager"), load(run, device="cpu", backend="eager")
    temperature = calibrated.card.temperature
    batch = torch.stack([load_sample(path, calibrated.transform) for path in images])
    logits = raw.logits(batch)
    expected = torch.softmax(logits / temperature, dim=1)
    for image, row, want in zip(images, calibrated.predict(images, topk=3), expected):
        raw_row = raw.predict([image], topk=3)[0]
        assert row.labels[0] == raw_row.labels[0]  # the same answer...
        assert row.probs == pytest.approx(want.topk(3).values.tolist(), abs=1e-5)  # ...with the calibrated confidence
    with TestClient(create_app(calibrated)) as client:
        answer = client.post("/predict", files={"file": (images[0].name, images[0].read_bytes(), "image/png")}).json()
    assert answer["top"][0]["prob"] == pytest.approx(float(expected[0].max()), abs=1e-5)


def test_training_with_calibrate_fits_on_its_own_val_split(tmp_path, one_thread) -> None:
    from imgrec.data.synth import SynthSpec, write_synth_dataset
    from imgrec.engine.tasks.classify import train
    from runs import quiet

    data = write_synth_dataset(tmp_path / "data", SynthSpec(classes=3, train_per_class=8, val_per_class=20, seed=2, min_side=32, max_side=40), workers=1)
    run = train(
        data=str(data), out=str(tmp_path / "run"), model="test_resnet", epochs=1, batch_size=8, device="cpu", precision="fp32",
        workers=0, tensorboard=False, data_config={"img_size": 32}, calibrate=True, console=quiet(),
    )  # fmt: skip
    card = json.loads((run / "model.json").read_text())
    assert card["temperature"] > 0
    assert card["calibration"]["images"] == 60 and card["calibration"]["data"] == "the run's validation split"
    assert card["calibration"]["nll_after"] <= card["calibration"]["nll_before"]


def test_the_report_shows_the_reliability_diagram(tmp_path) -> None:
    from imgrec.report import write_report

    logits, labels = two_class_logits([0.95, 0.95, 0.7, 0.7]), torch.tensor([0, 1, 0, 0])
    metrics = {"top1": 75.0, "top5": 100.0, "loss": 0.8, "n": 4, **calibration_metrics(logits, labels), "temperature": None}
    page = write_report(tmp_path / "r.html", title="t", history=[], metrics=metrics, predictions=[]).read_text()
    assert "<h2>Calibration</h2>" in page and "expected calibration error 37.50%" in page and 'alt="reliability diagram"' in page
    assert "<th>ECE</th>" in page or ">ECE<" in page


def test_a_set_without_mistakes_is_refused_not_fitted_to_certainty(run_dir, tmp_path) -> None:
    """With no wrong answers the NLL falls as T -> 0; calibrate refuses rather than make the model
    certain of everything, and train --calibrate leaves the model uncalibrated, saying why."""
    from imgrec.calibration import fit_temperature, unfit_reason

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.5]]).repeat(40, 1)
    labels = torch.tensor([0, 1]).repeat(40)
    temperature = fit_temperature(logits, labels)
    assert temperature < 0.2  # the fit runs to the floor...
    assert "without a mistake the best temperature is near 0" in unfit_reason(logits, labels, temperature)  # ...and is not used
    flipped = labels.clone()
    flipped[0] = 1 - flipped[0]  # one mistake bounds the fit
    assert fit_temperature(logits, flipped) > 0.1 and unfit_reason(logits, flipped, fit_temperature(logits, flipped)) is None


def test_calibrate_records_its_tta_and_restamps_exported_cards(run_dir, tmp_path) -> None:
    from imgrec.engine.calibrate import calibrate

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model.onnx").write_bytes(b"onnx")  # stands for an export; its card beside it
    (run / "model.onnx.json").write_text(json.dumps({"architecture": "old"}))
    data = run_dir.parent / "data" / "train"
    result = calibrate(run, data, tta="flip", device="cpu", precision="fp32", workers=0)
    card = json.loads((run / "model.json").read_text())
    assert card["calibration"]["tta"] == "flip" and result["exports"] == [str(run / "model.onnx")]
    assert json.loads((run / "model.onnx.json").read_text())["temperature"] == card["temperature"]
