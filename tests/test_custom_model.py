"""Any nn.Module as the model: a class in a file (CLI and API), a module object, a Keras-style
nn.Sequential; each trains, loads, predicts, exports to ONNX and serves; a wrong output shape or
an import that fails is a clear error before training."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import imgrec
from imgrec.inference.backends.onnx import onnx_session
from imgrec.inference.export import export
from imgrec.models.custom import ModelSpecError, build_custom, describe, sequential_from_layers, sequential_layers

NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        # The seeds' kind of hand-written CNN.
        def __init__(self, num_classes: int = 10, width: int = 16):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))


    class Wrong(Net):
        def forward(self, x):
            return super().forward(x)[:, :2]
    """
)

QUIET = {"console": Console(file=io.StringIO()), "device": "cpu", "workers": 0, "tensorboard": False, "batch_size": 8}


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "net.py"
    path.write_text(NET)
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgrec", *args], capture_output=True, text=True, env={**os.environ})


@pytest.fixture(scope="module")
def file_run(net_file, tiny_shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("custom") / "run"
    done = cli("train", "--data", str(tiny_shapes), "--model", f"{net_file}:Net", "--model-args", '{"width": 8}', "--img-size", "32",
               "--epochs", "1", "--batch-size", "8", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_a_class_in_a_file_trains_from_the_cli_and_loads_as_plain_pytorch(file_run, net_file):
    card = json.loads((file_run / "model.json").read_text())
    assert card["architecture"] == f"{net_file.resolve()}:Net" and card["model_args"] == {"width": 8}
    model = imgrec.load(file_run).model
    assert type(model).__name__ == "Net" and model.head.out_features == 3 and model.features[0].out_channels == 8
    saved = load_file(str(file_run / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_custom_model_predicts_exports_and_serves(file_run, tiny_shapes, tmp_path):
    images = sorted((tiny_shapes / "val").glob("*/*"))[:3]
    predicted = cli("predict", str(file_run), *map(str, images), "--format", "json")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = json.loads(predicted.stdout)
    assert len(rows) == 3 and all(r["top"][0]["class"] in json.loads((file_run / "model.json").read_text())["classes"] for r in rows)
    report = export(file_run, "onnx", out=tmp_path / "model.onnx")
    assert report.top1_agreement == 100.0
    model = imgrec.load(file_run).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_session(tmp_path / "model.onnx").run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4, rtol=1e-4)
    from serving import running_server

    classifier = imgrec.load(file_run, device="cpu")
    with running_server(classifier) as (url, _):
        request = urllib.request.Request(f"{url}/predict", data=images[0].read_bytes(), headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    assert answer["top"][0]["class"] == rows[0]["top"][0]["class"]


def test_a_module_object_is_trained_in_place_and_recorded_by_its_file(net_file, tiny_shapes, tmp_path):
    from imgrec.models.custom import import_class

    Net = import_class(f"{net_file}:Net")
    torch.manual_seed(0)
    net = Net(num_classes=3, width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = imgrec.train(data=str(tiny_shapes), model=net, model_args={"num_classes": 3, "width": 8}, out=str(tmp_path / "obj"), epochs=1,
                       data_config={"img_size": 32}, **QUIET)  # fmt: skip
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # this object trained
    saved = load_file(str(Path(run) / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())  # one epoch: the saved model is it
    loaded = imgrec.load(run).model
    assert type(loaded).__name__ == "Net" and all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_a_keras_style_sequential_trains_and_rebuilds(tiny_shapes, tmp_path):
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 3)
    )
    rebuilt = sequential_from_layers(sequential_layers(model))
    assert str(rebuilt) == str(model)
    run = imgrec.train(data=str(tiny_shapes), model=model, out=str(tmp_path / "seq"), epochs=1, data_config={"img_size": 32}, **QUIET)
    loaded = imgrec.load(run).model
    assert str(loaded) == str(model)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))


def test_wrong_shapes_and_imports_are_clear_errors_before_training(net_file, tiny_shapes, tmp_path):
    wrong = cli("train", "--data", str(tiny_shapes), "--model", f"{net_file}:Wrong", "--img-size", "32", "--epochs", "1", "--out", str(tmp_path / "w"))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "to (2, 2)" in wrong.stderr and "must give [2, 3] logits" in wrong.stderr
    assert not (tmp_path / "w" / "last.pt").exists()
    missing = cli("train", "--data", str(tiny_shapes), "--model", str(tmp_path / "nope.py:Net"), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and "no file" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_here\n")
    failed = cli("train", "--data", str(tiny_shapes), "--model", f"{broken}:Net", "--out", str(tmp_path / "b"))
    assert failed.returncode == 2 and "no_such_package_here" in failed.stderr and "Traceback" not in failed.stderr
    bad_json = cli("train", "--data", str(tiny_shapes), "--model", f"{net_file}:Net", "--model-args", "{width: 8}", "--out", str(tmp_path / "j"))
    assert bad_json.returncode == 2 and "--model-args" in bad_json.stderr


def test_a_module_that_cannot_be_rebuilt_is_refused(net_file):
    from torch import nn

    class Local(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ModelSpecError, match="inside a function"):
        describe(Local())
    with pytest.raises(ModelSpecError, match="could not be built"):
        build_custom(f"{net_file}:Net", 3, {"no_such_argument": 1})
