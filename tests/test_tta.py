"""Test-time augmentation: the views are what they say, the logits are their average, and
evaluate, predict and serve use them; mirrored views are refused for a run trained without flips."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from imgrec.data.tta import averaged, check_tta, tta_views


def test_views_are_the_input_its_corner_crops_and_their_mirrors() -> None:
    batch = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert [v.shape for v in tta_views(batch, None)] == [batch.shape]
    flip = tta_views(batch, "flip")
    assert len(flip) == 2 and torch.equal(flip[0], batch) and torch.equal(flip[1], batch.flip(-1))
    crops = tta_views(batch, "crops")
    assert len(crops) == 5 and all(v.shape == batch.shape for v in crops)
    side = 7  # round(8 * 0.875)
    bottom_right = F.interpolate(batch[..., 8 - side :, 8 - side :], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(crops[4], bottom_right)
    assert crops[1][0, 0, 0, 0] == batch[0, 0, 0, 0] and crops[4][0, 0, -1, -1] == batch[0, 0, -1, -1]  # corners kept
    both = tta_views(batch, "flip+crops")
    assert len(both) == 10 and torch.equal(both[9], crops[4].flip(-1))
    with pytest.raises(ValueError, match="--tta must be one of flip, crops, flip\\+crops, got 'rotate'"):
        tta_views(batch, "rotate")


def test_the_logits_are_the_mean_over_the_views() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(3, 3, 16, 16)
    model(x)
    by_hand = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(averaged(model, x, "flip"), by_hand, atol=1e-6)
    assert not torch.allclose(averaged(model, x, "flip"), model(x), atol=1e-4)  # the mirror changes something
    ten = torch.stack([model(v) for v in tta_views(x, "flip+crops")]).mean(0)
    assert torch.allclose(averaged(model, x, "flip+crops"), ten, atol=1e-6)


def test_predict_and_evaluate_average_the_views(run_dir) -> None:
    from imgrec.data.decode import load_sample
    from imgrec.engine.evaluate import evaluate
    from imgrec.inference.predict import load

    data = run_dir.parent / "data"
    plain, tta = load(run_dir, device="cpu", backend="eager"), load(run_dir, device="cpu", backend="eager", tta="flip")
    images = sorted(p for p in (data / "val").rglob("*") if p.is_file())[:3]
    batch = torch.stack([load_sample(p, plain.transform) for p in images])
    inputs = plain.normalize(batch)
    with torch.inference_mode():
        expected = (plain.forward(inputs) + plain.forward(inputs.flip(-1))) / 2
        assert torch.allclose(tta.logits(batch), expected, atol=1e-5)
    probs = [row.probs[0] for row in tta.predict(images, topk=1)]
    assert probs == pytest.approx(torch.softmax(expected, 1).max(1).values.tolist(), abs=1e-5)
    options = {"device": "cpu", "precision": "fp32", "workers": 0}
    flipped, base = evaluate(run_dir, data, tta="flip", **options), evaluate(run_dir, data, **options)
    assert flipped["tta"] == "flip" and base["tta"] is None and flipped["n"] == base["n"]
    assert flipped["loss"] != base["loss"]


def test_mirrored_views_are_refused_for_a_run_trained_without_flips(run_dir, tmp_path) -> None:
    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data_config"]["hflip"] = 0.0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="trained without horizontal flips.*use --tta crops"):
        check_tta("flip+crops", run)
    assert check_tta("crops", run) == "crops" and check_tta(None, run) is None


def test_the_cli_takes_tta(run_dir, capsys) -> None:
    from imgrec.cli import main

    data = run_dir.parent / "data"
    image = next(p for p in sorted((data / "val").rglob("*")) if p.is_file())
    assert main(["predict", str(run_dir), str(image), "--tta", "crops", "--device", "cpu", "--backend", "eager", "--format", "json"]) == 0
    assert '"top"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", str(run_dir), "--data", str(data), "--tta", "spin"])
    assert "invalid choice: 'spin'" in capsys.readouterr().err
