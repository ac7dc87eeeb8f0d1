"""The Open Inference Protocol v2 over gRPC, through Triton's own client (tritonclient.grpc):
health, metadata, BYTES and UINT8 inputs giving what predict gives, and errors as status codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving import running_server

grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "grpc-test-key-0123456789"


@pytest.fixture(scope="module")
def grpc_server(classifier):
    from imgrec.serve import ServeConfig

    with running_server(classifier, ServeConfig(name="shapes"), grpc=True) as (_, server):
        yield grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def val_images(tiny_run) -> list:
    return [p for p in sorted((tiny_run[1] / "val").rglob("*")) if p.is_file()][:4]


def test_health_and_metadata(grpc_server) -> None:
    assert grpc_server.is_server_live() and grpc_server.is_server_ready() and grpc_server.is_model_ready("shapes")
    assert grpc_server.get_server_metadata().name == "imgrec"
    meta = grpc_server.get_model_metadata("shapes")
    assert meta.name == "shapes" and [t.name for t in meta.inputs] == ["image", "pixels", "input"]
    assert [t.name for t in meta.outputs] == ["probabilities", "indices", "classes", "names", "logits"]


def test_bytes_input_gives_what_predict_gives(grpc_server, classifier, tiny_run) -> None:
    paths = val_images(tiny_run)
    images = grpcclient.InferInput("image", [len(paths)], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
    result = grpc_server.infer("shapes", [images], parameters={"top_k": 2})
    expected = classifier.predict(paths, topk=2)
    assert [[c.decode() for c in row] for row in result.as_numpy("classes")] == [p.labels for p in expected]
    assert np.allclose(result.as_numpy("probabilities"), [p.probs for p in expected], atol=1e-5)
    assert result.as_numpy("indices").tolist() == [p.indices for p in expected]


def test_uint8_pixels_and_requested_outputs(grpc_server, classifier) -> None:
    pixels = torch.randint(0, 256, (2, 3, 40, 52), dtype=torch.uint8)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels.numpy())
    outputs = [grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("probabilities", class_count=1)]
    result = grpc_server.infer("shapes", [tensor], outputs=outputs)
    expected = classifier.predict(pixels, topk=1)
    assert result.as_numpy("logits").shape == (2, len(classifier.classes))
    strings = [s.decode() for s in result.as_numpy("probabilities").ravel()]  # Triton's classification: "value:index:label"
    assert [s.split(":")[2] for s in strings] == [p.label for p in expected]


def test_errors_come_back_as_status_codes(grpc_server, tiny_run) -> None:
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([val_images(tiny_run)[0].read_bytes()], dtype=np.object_))
    with pytest.raises(InferenceServerException) as unknown:
        grpc_server.infer("nosuchmodel", [image])
    assert "NOT_FOUND" in unknown.value.status() and "no model 'nosuchmodel'" in unknown.value.message()
    broken = grpcclient.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as bad:
        grpc_server.infer("shapes", [broken])
    assert "INVALID_ARGUMENT" in bad.value.status() and "input[0]" in bad.value.message()
    half = grpcclient.InferInput("input", [1, 3, 8, 8], "FP16")
    half.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float16))
    with pytest.raises(InferenceServerException) as dtype:
        grpc_server.infer("shapes", [half])
    assert "INVALID_ARGUMENT" in dtype.value.status() and "FP16" in dtype.value.message()
    assert grpc_server.is_server_ready()  # the server goes on


def test_keys_guard_grpc_too_and_health_stays_open(classifier, tiny_run) -> None:
    with running_server(classifier, api_keys=[KEY], grpc=True) as (_, server):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata("imgrec")
        assert "UNAUTHENTICATED" in refused.value.status()
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([val_images(tiny_run)[0].read_bytes()], dtype=np.object_))
        result = client.infer("imgrec", [image], headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("classes").shape == (1, 3)
