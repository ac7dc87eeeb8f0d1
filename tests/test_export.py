"""``imgrec export``: ONNX (fp32 and int8) and TorchScript files that compute what the eager model does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from imgrec.card import ModelCard
from imgrec.cli import main
from imgrec.inference.backends.onnx import onnx_session
from imgrec.inference.export import export, load_torchscript, read_export_info
from imgrec.models.directory import load_model_dir


def test_onnx_export_matches_the_eager_model_at_any_batch_size(run_dir, tmp_path):
    path = tmp_path / "model.onnx"
    report = export(run_dir, "onnx", out=path)
    assert report.images == 36 and report.max_abs_diff < 1e-4 and report.top1_agreement == 100.0
    card = ModelCard.read(run_dir)
    assert ModelCard.from_dict(read_export_info(path)) == card  # inside the file...
    assert ModelCard.from_dict(json.loads((tmp_path / "model.onnx.json").read_text())) == card  # ...and beside it
    assert read_export_info(path)["classes"] == card.classes and json.loads((tmp_path / "model.onnx.json").read_text())["mean"] == list(card.data_config.mean)
    model, _ = load_model_dir(run_dir)
    session = onnx_session(path)
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_torchscript_export_matches_the_eager_model(run_dir, tmp_path):
    path = tmp_path / "model.pt"
    report = export(run_dir, "torchscript", out=path)
    assert report.max_abs_diff < 1e-5 and report.top1_agreement == 100.0
    assert read_export_info(path)["architecture"] == "test_resnet"
    scripted = load_torchscript(path)
    model, _ = load_model_dir(run_dir)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_int8_export_is_quantised_and_reports_its_agreement(run_dir, tmp_path):
    import onnx

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export(run_dir, "onnx", out=fp32)
    report = export(run_dir, "onnx", out=int8, int8=True, calibration_images=30, min_agreement=0)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # int8 weights
    assert report.int8 and 0 <= report.top1_agreement <= 100 and report.max_abs_diff > 0
    assert "quantization" in read_export_info(int8)


def test_a_failed_parity_check_is_an_error_naming_the_figures_and_keeps_the_file(run_dir, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=r"does not match the eager model on 36 images: max \|logit difference\| .* \(allowed 0.0\)"):
        export(run_dir, "onnx", out=path, tolerance=0.0)
    assert path.is_file()


def test_export_command_writes_its_figures(run_dir, tmp_path, capsys):
    out, figures = tmp_path / "m.pt", tmp_path / "check.json"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--json", str(figures)]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    assert json.loads(figures.read_text())["top1_agreement"] == 100.0
    assert main(["export", str(run_dir), "--format", "torchscript", "--int8"]) == 2
    assert "--int8 quantises with onnxruntime" in capsys.readouterr().err


def test_without_its_data_the_export_asks_for_images(run_dir, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    config = (moved / "config.yaml").read_text().replace(f"data: {json.dumps(str(run_dir.parent / 'data'))[1:-1]}", "data: /nowhere")
    (moved / "config.yaml").write_text(config)
    with pytest.raises(ValueError, match="pass --images DIR"):
        export(moved, "onnx", out=tmp_path / "m.onnx")
    report = export(moved, "torchscript", out=tmp_path / "m.pt", images=run_dir.parent / "data" / "val" / "circle")
    assert report.images == 12
