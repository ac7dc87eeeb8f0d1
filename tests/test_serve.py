"""``imgrec serve``: the Open Inference Protocol v2, ``/predict``, metrics, limits and dynamic batching.

One tiny model is trained for the module (``serving.train_tiny_run``) and served by two real
uvicorn servers: ``served`` with small limits (64 KiB bodies, 100,000 pixels, 8 images) for the
protocol, client and error tests, and ``batching_server`` (max_batch 8, max_wait 300 ms) for
batching through HTTP. Every answer is checked against what ``Classifier.predict`` (eager fp32
on the CPU, deterministic) says for the same files, through httpx and through the real Triton
client (``tritonclient.http``) with its defaults (binary tensors).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imagefiles import decompression_bomb, jpeg_bytes, photo
from serving import running_server

MODEL = "tiny"
MAX_BODY = 64 * 1024
MAX_PIXELS = 100_000  # a 400x400 image is over it; the 40-64 px synthetic images are far below
MAX_IMAGES = 8
INFER = f"/v2/models/{MODEL}/infer"
INFER_ROUTE = "/v2/models/{name}/infer"


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_files(tiny_run) -> list[Path]:
    """Validation JPEGs, one per class first, then the rest."""
    by_class = [sorted(d.glob("*.jpg")) for d in sorted((tiny_run[1] / "val").iterdir()) if d.is_dir()]
    assert len(by_class) == 3 and all(by_class)
    return [files[0] for files in by_class] + [f for files in by_class for f in files[1:]]


@pytest.fixture(scope="module")
def mixed_files(val_files, tmp_path_factory) -> list[Path]:
    """Two JPEGs and two PNGs (PNG copies of other validation images)."""
    folder = tmp_path_factory.mktemp("png")
    pngs = []
    for path in val_files[2:4]:
        png = folder / (path.stem + ".png")
        Image.open(path).convert("RGB").save(png, "PNG")
        pngs.append(png)
    return [val_files[0], pngs[0], val_files[1], pngs[1]]


@pytest.fixture(scope="module")
def served(classifier):
    from imgrec.serve import ServeConfig

    config = ServeConfig(name=MODEL, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, max_images=MAX_IMAGES, max_wait_ms=2)
    with running_server(classifier, config) as (base_url, server):
        yield base_url, server


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def triton(served):
    import tritonclient.http as httpclient

    triton_client = httpclient.InferenceServerClient(url=served[0].removeprefix("http://"), network_timeout=30)
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def batching_server(classifier):
    from imgrec.serve import ServeConfig

    with running_server(classifier, ServeConfig(name=MODEL, max_batch=8, max_wait_ms=300)) as (base_url, server):
        yield base_url, server


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the model directory this test may change."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


# -- helpers ----------------------------------------------------------------------------------
def expected(classifier, paths, k: int = 5) -> SimpleNamespace:
    """What ``Classifier.predict`` says for ``paths``, as arrays."""
    predictions = classifier.predict([str(p) for p in paths], topk=k)
    assert all(p.error is None for p in predictions)
    return SimpleNamespace(
        probs=np.array([p.probs for p in predictions], dtype=np.float32),
        indices=np.array([p.indices for p in predictions], dtype=np.int64),
        labels=[p.labels for p in predictions],
        top=[p.to_dict()["top"] for p in predictions],
    )


def reference_logits(classifier, paths) -> np.ndarray:
    from imgrec.data.decode import load_sample

    return classifier.logits(torch.stack([load_sample(p, classifier.transform) for p in paths])).numpy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bytes_request(images: list[bytes], shape: list[int] | None = None, **extra) -> dict:
    """A JSON infer request with one BYTES input of base64-encoded images."""
    tensor = {"name": "image", "datatype": "BYTES", "shape": shape or [len(images)], "data": [b64(i) for i in images]}
    return {"inputs": [tensor], **extra}


def binary_body(header: dict, blob: bytes, length: int | str | None = None) -> dict:
    """httpx keyword arguments for a binary-extension request: JSON header, then ``blob``."""
    text = json.dumps(header).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(text) if length is None else length),
        "Content-Type": "application/octet-stream",
    }
    return {"content": text + blob, "headers": headers}


def outputs_by_name(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def as_array(output: dict) -> np.ndarray:
    return np.array(output["data"]).reshape(output["shape"])


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, keyed by (sample name, labels)."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(response.text) for s in family.samples
    }  # fmt: skip


def sample(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def assert_ready(http: httpx.Client) -> None:
    response = http.get("/v2/health/ready")
    assert response.status_code == 200 and response.json() == {"ready": True}


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """A smooth image: a few kilobytes as PNG or JPEG whatever its size."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8))


# -- the v2 protocol over HTTP ----------------------------------------------------------------
def test_server_and_model_metadata_endpoints(client, classifier):
    from imgrec import __version__

    server = client.get("/v2")
    assert server.status_code == 200
    assert server.json()["name"] == "imgrec" and server.json()["version"] == __version__
    assert "binary_tensor_data" in server.json()["extensions"] and "classification" in server.json()["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert_ready(client)

    metadata = client.get(f"/v2/models/{MODEL}")
    assert metadata.status_code == 200
    body = metadata.json()
    assert body["name"] == MODEL and body["versions"] == ["1"] and body["platform"] == "imgrec/eager"
    assert {i["datatype"] for i in body["inputs"]} == {"BYTES", "UINT8", "FP32"}
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in body["inputs"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 3]} in body["outputs"]
    params = body["parameters"]
    assert params["classes"] == classifier.classes and params["img_size"] == 32 and params["architecture"] == "test_resnet"
    assert (params["max_body_bytes"], params["max_pixels"], params["max_images"]) == (MAX_BODY, MAX_PIXELS, MAX_IMAGES)
    assert client.get(f"/v2/models/{MODEL}/versions/1").json() == body

    for path in (f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"):
        ready = client.get(path)
        assert ready.status_code == 200 and ready.json() == {"name": MODEL, "ready": True}


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_json_infer_with_base64_images_equals_predict(client, classifier, mixed_files, top_k):
    images = [p.read_bytes() for p in mixed_files]
    outputs = [{"name": n} for n in ("probabilities", "classes", "indices", "names", "logits")]
    request = bytes_request(images, outputs=outputs, parameters={"top_k": top_k}, id=f"request-{top_k}")
    response = client.post(INFER, json=request)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (MODEL, "1", f"request-{top_k}")
    out = outputs_by_name(response)
    want = expected(classifier, mixed_files, top_k)
    n = len(mixed_files)
    assert out["probabilities"]["shape"] == [n, top_k] and out["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(as_array(out["probabilities"]), want.probs, atol=1e-5)
    assert out["indices"]["datatype"] == "INT64" and as_array(out["indices"]).tolist() == want.indices.tolist()
    assert out["classes"]["datatype"] == "BYTES" and as_array(out["classes"]).tolist() == want.labels
    assert as_array(out["names"]).tolist() == want.labels  # the synthetic classes have no separate names
    assert out["logits"]["shape"] == [n, len(classifier.classes)]
    np.testing.assert_allclose(as_array(out["logits"]), reference_logits(classifier, mixed_files), atol=1e-5)


def test_json_infer_defaults_and_b64_objects(client, classifier, val_files):
    """No outputs asked for: the four default ones, top_k 5 (capped at the 3 classes); {"b64": ...} elements work too."""
    files = val_files[:2]
    request = {
        "inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [{"b64": b64(p.read_bytes())} for p in files]}]
    }
    response = client.post(INFER, json=request)
    assert [o["name"] for o in response.json()["outputs"]] == ["probabilities", "indices", "classes", "names"]
    assert "id" not in response.json()
    out = outputs_by_name(response)
    want = expected(classifier, files, 5)
    assert out["probabilities"]["shape"] == [2, 3]
    np.testing.assert_allclose(as_array(out["probabilities"]), want.probs, atol=1e-5)
    assert as_array(out["classes"]).tolist() == want.labels


def test_binary_data_output_over_http(client, classifier, val_files):
    """binary_data_output: the outputs come after the JSON header, their sizes in binary_data_size."""
    files = val_files[:3]
    request = bytes_request([p.read_bytes() for p in files], parameters={"binary_data_output": True, "top_k": 2},
                            outputs=[{"name": "probabilities"}, {"name": "indices"}])  # fmt: skip
    response = client.post(INFER, json=request)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    header, blob = json.loads(response.content[:length]), response.content[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [3 * 2 * 4, 3 * 2 * 8] and len(blob) == sum(sizes)
    want = expected(classifier, files, 2)
    np.testing.assert_allclose(np.frombuffer(blob[: sizes[0]], np.float32).reshape(3, 2), want.probs, atol=1e-5)
    assert np.frombuffer(blob[sizes[0] :], np.int64).reshape(3, 2).tolist() == want.indices.tolist()


# -- the real Triton client -------------------------------------------------------------------
def test_triton_client_health_and_metadata(triton, classifier):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("no-such-model")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    metadata = triton.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["parameters"]["classes"] == classifier.classes
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "indices", "classes", "names", "logits"]


def test_triton_client_bytes_input_equals_predict(triton, classifier, mixed_files):
    import tritonclient.http as httpclient

    data = np.array([p.read_bytes() for p in mixed_files], dtype=np.object_)
    image = httpclient.InferInput("image", [len(mixed_files)], "BYTES")
    image.set_data_from_numpy(data)  # binary_data=True, the client's default
    result = triton.infer(MODEL, [image], parameters={"top_k": 2})
    assert result.get_response()["model_name"] == MODEL
    want = expected(classifier, mixed_files, 2)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probs, atol=1e-5)
    assert result.as_numpy("probabilities").dtype == np.float32
    assert result.as_numpy("indices").tolist() == want.indices.tolist()
    assert [[c.decode() for c in row] for row in result.as_numpy("classes")] == want.labels


def test_triton_client_uint8_pixels_either_layout(triton, classifier):
    import tritonclient.http as httpclient

    rng = np.random.default_rng(7)
    nhwc = rng.integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    results = []
    for array in (nhwc, nchw):
        pixels = httpclient.InferInput("pixels", list(array.shape), "UINT8")
        pixels.set_data_from_numpy(array)
        outputs = [httpclient.InferRequestedOutput(n) for n in ("logits", "probabilities", "indices")]
        results.append(triton.infer(MODEL, [pixels], outputs=outputs, parameters={"top_k": 3}))
    for name in ("logits", "probabilities", "indices"):
        assert np.array_equal(results[0].as_numpy(name), results[1].as_numpy(name)), name
    assert results[0].as_numpy("logits").shape == (2, 3)
    predictions = classifier.predict(torch.from_numpy(nchw), topk=3)
    np.testing.assert_allclose(results[0].as_numpy("probabilities"), [p.probs for p in predictions], atol=1e-5)
    assert results[0].as_numpy("indices").tolist() == [p.indices for p in predictions]


def test_triton_client_fp32_model_input_gives_the_forward_logits(triton, classifier):
    import tritonclient.http as httpclient

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tensor = httpclient.InferInput("input", [3, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(x.numpy())
    result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), classifier.forward(x).numpy(), atol=1e-5, rtol=1e-5)


def test_triton_client_classification_strings(triton, classifier, val_files):
    import tritonclient.http as httpclient

    files = val_files[:3]
    image = httpclient.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array([p.read_bytes() for p in files], dtype=np.object_))
    result = triton.infer(MODEL, [image], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2)])
    strings = result.as_numpy("probabilities")
    assert strings.shape == (3, 2)
    want = expected(classifier, files, 2)
    for row, probs, indices, labels in zip(strings, want.probs, want.indices, want.labels):
        parsed = [s.decode().split(":") for s in row]
        assert [int(i) for _, i, _ in parsed] == indices.tolist() and [c for _, _, c in parsed] == labels
        np.testing.assert_allclose([float(v) for v, _, _ in parsed], probs, atol=2e-6)


def test_triton_client_errors_raise_with_the_servers_message(triton, val_files, client):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([val_files[0].read_bytes(), b"not an image at all"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(MODEL, [image])
    assert caught.value.status() == "400" and "input[1]" in caught.value.message()
    assert "not an image" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("no-such-model", [image])
    assert caught.value.status() == "404" and "no model 'no-such-model'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata(MODEL, "7")
    assert "version '7'" in caught.value.message()
    assert_ready(client)


# -- bad requests -----------------------------------------------------------------------------
def good_jpeg(val_files) -> bytes:
    return val_files[0].read_bytes()


def chunks(total: int, size: int = 16 * 1024):
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size


def fp32_json(shape: list[int], values: int) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": [0.0] * values}]}


TRUNCATED = jpeg_bytes(photo(64, 48, 11), quality=90)
BAD_REQUESTS = {
    # id: (method, path, request kwargs from a good JPEG, status, kind, fragments of the message)
    "body over the limit, Content-Length": (
        "POST", INFER, lambda g: {"content": b"\0" * (MAX_BODY + 1)}, 413, "body_too_large", ["65,537 bytes", "65,536"]),
    "body over the limit, chunked": (
        "POST", INFER, lambda g: {"content": chunks(MAX_BODY * 2)}, 413, "body_too_large", ["131,072 bytes", "65,536"]),
    "predict body over the limit": (
        "POST", "/predict", lambda g: {"content": b"\xff" * (MAX_BODY + 100), "headers": {"content-type": "image/jpeg"}},
        413, "body_too_large", ["65,636 bytes"]),
    "png over the pixel limit": (
        "POST", INFER, lambda g: {"json": bytes_request([g, image_bytes(gradient(400, 400), "PNG")])}, 413, "too_many_pixels",
        ["input[1]", "400x400", "100,000"]),
    "jpeg over the pixel limit": (
        "POST", INFER, lambda g: {"json": bytes_request([jpeg_bytes(gradient(400, 300))])}, 413, "too_many_pixels",
        ["input[0]", "400x300"]),
    "decompression bomb": (
        "POST", INFER, lambda g: {"json": bytes_request([decompression_bomb()])}, 413, "too_many_pixels", ["input[0]", "3,600,000,000 pixels"]),
    "long thin strip (few pixels, a huge resize)": (
        "POST", INFER, lambda g: {"json": bytes_request([image_bytes(gradient(400, 2), "PNG")])}, 413, "too_many_pixels",
        ["input[0]", "400x2", "would be resized", "nearer to square"]),
    "uint8 long thin strip": (
        "POST", INFER, lambda g: {"json": {"inputs": [{"name": "p", "datatype": "UINT8", "shape": [1, 3, 1, 300], "data": [0] * 900}]}},
        413, "too_many_pixels", ["300x1", "would be resized"]),
    "an output asked for twice": (
        "POST", INFER, lambda g: {"json": {**bytes_request([g]), "outputs": [{"name": "logits"}, {"name": "logits"}]}}, 400, "bad_request",
        ["more than once", "logits, logits"]),
    "huge fp32 values": (
        "POST", INFER, lambda g: {"json": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [1e30] * 3072}]}},
        400, "bad_value", ["beyond", "normalised model input"]),
    "corrupt bytes": (
        "POST", INFER, lambda g: {"json": bytes_request([g, b"\x00garbage" * 100])}, 400, "bad_image", ["input[1]", "not an image"]),
    "truncated jpeg": (
        "POST", INFER, lambda g: {"json": bytes_request([TRUNCATED[: len(TRUNCATED) // 2], g])}, 400, "bad_image",
        ["input[0]", "truncated"]),
    "empty file": ("POST", INFER, lambda g: {"json": bytes_request([g, g, b""])}, 400, "bad_image", ["input[2]", "empty"]),
    "fp32 of the wrong size": (
        "POST", INFER, lambda g: {"json": fp32_json([1, 3, 16, 16], 768)}, 400, "bad_shape", ["[1, 3, 16, 16]", "[N, 3, 32, 32]"]),
    "uint8 with 3 dims": (
        "POST", INFER, lambda g: {"json": {"inputs": [{"name": "p", "datatype": "UINT8", "shape": [8, 8, 3], "data": [0] * 192}]}},
        400, "bad_shape", ["[8, 8, 3]"]),
    "bytes count mismatch": ("POST", INFER, lambda g: {"json": bytes_request([g, g], shape=[3])}, 400, "bad_shape", ["says 3 images", "holds 2"]),
    "fp32 value count mismatch": ("POST", INFER, lambda g: {"json": fp32_json([1, 3, 32, 32], 10)}, 400, "bad_shape", ["3072 values", "10"]),
    "binary fp32 size mismatch": (
        "POST", INFER,
        lambda g: binary_body({"inputs": [{"name": "i", "datatype": "FP32", "shape": [2, 3, 32, 32], "parameters": {"binary_data_size": 3 * 32 * 32 * 4}}]},
                              b"\0" * (3 * 32 * 32 * 4)),
        400, "bad_shape", ["12288 bytes of FP32", "[2, 3, 32, 32]"]),
    "int32 input": (
        "POST", INFER, lambda g: {"json": {"inputs": [{"name": "i", "datatype": "INT32", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}},
        400, "bad_dtype", ["'INT32'"]),
    "fp16 input": (
        "POST", INFER,
        lambda g: binary_body({"inputs": [{"name": "i", "datatype": "FP16", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": 6144}}]},
                              b"\0" * 6144),
        400, "bad_dtype", ["'FP16'"]),
    "non-numbers for fp32": (
        "POST", INFER, lambda g: {"json": {"inputs": [{"name": "i", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["x"] * 3072}]}},
        400, "bad_dtype", ["FP32"]),
    "nan in fp32": (
        "POST", INFER,
        lambda g: binary_body({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": 12288}}]},
                              np.full(3072, np.nan, np.float32).tobytes()),
        400, "bad_value", ["NaN"]),
    "parameters of the request not an object": (
        "POST", INFER, lambda g: {"json": bytes_request([g], parameters=["top_k", 2])}, 400, "bad_request",
        ["'parameters' of the request must be a JSON object"]),
    "parameters of the input not an object": (
        "POST", INFER, lambda g: {"json": {"inputs": [{**bytes_request([g])["inputs"][0], "parameters": "binary"}]}}, 400, "bad_request",
        ["'parameters' of the input"]),
    "parameters of an output not an object": (
        "POST", INFER, lambda g: {"json": bytes_request([g], outputs=[{"name": "classes", "parameters": [2]}])}, 400, "bad_request",
        ["'parameters' of output 'classes'"]),
    "unknown model": ("POST", "/v2/models/resnet/infer", lambda g: {"json": bytes_request([g])}, 404, "unknown_model", ["'resnet'"]),
    "unknown model metadata": ("GET", "/v2/models/resnet", lambda g: {}, 404, "unknown_model", ["'resnet'", f"'{MODEL}'"]),
    "unknown model ready": ("GET", "/v2/models/resnet/ready", lambda g: {}, 404, "unknown_model", ["'resnet'"]),
    "unknown version infer": (
        "POST", f"/v2/models/{MODEL}/versions/2/infer", lambda g: {"json": bytes_request([g])}, 404, "unknown_model", ["version '2'"]),
    "unknown version ready": ("GET", f"/v2/models/{MODEL}/versions/3/ready", lambda g: {}, 404, "unknown_model", ["version '3'"]),
    "malformed json": (
        "POST", INFER, lambda g: {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400, "bad_request",
        ["not valid JSON"]),
    "json but not an object": ("POST", INFER, lambda g: {"json": [1, 2]}, 400, "bad_request", ["JSON object"]),
    "no inputs": ("POST", INFER, lambda g: {"json": {"inputs": []}}, 400, "bad_request", ["exactly one tensor", "got 0"]),
    "header length past the body": (
        "POST", INFER, lambda g: binary_body(bytes_request([g]), b"", length=10_000), 400, "bad_request",
        ["Inference-Header-Content-Length 10000"]),
    "header length not a number": (
        "POST", INFER, lambda g: binary_body(bytes_request([g]), b"", length="ten"), 400, "bad_request", ["must be an integer"]),
    "binary_data_size mismatch": (
        "POST", INFER,
        lambda g: binary_body({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(g) + 10}}]},
                              len(g).to_bytes(4, "little") + g),
        400, "bad_request", ["binary_data_size", "does not match"]),
    "binary bytes element runs past the end": (
        "POST", INFER,
        lambda g: binary_body({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + 10}}]},
                              (1000).to_bytes(4, "little") + b"\0" * 10),
        400, "bad_request", ["1000 bytes runs past the end"]),
    "too many images": (
        "POST", INFER, lambda g: {"json": bytes_request([g] * (MAX_IMAGES + 1))}, 413, "too_many_images", ["9 images", f"limit of {MAX_IMAGES}"]),
    "no images": ("POST", INFER, lambda g: {"json": bytes_request([], shape=[0])}, 400, "bad_shape", ["no images"]),
    "unknown output": (
        "POST", INFER, lambda g: {"json": bytes_request([g], outputs=[{"name": "scores"}])}, 400, "unknown_output", ["'scores'", "probabilities"]),
    "bad top_k": ("POST", INFER, lambda g: {"json": bytes_request([g], parameters={"top_k": 0})}, 400, "bad_request", ["top_k"]),
    "bad classification count": (
        "POST", INFER, lambda g: {"json": bytes_request([g], outputs=[{"name": "classes", "parameters": {"classification": "two"}}])},
        400, "bad_request", ["positive integer"]),
    "compressed body": (
        "POST", INFER, lambda g: {"content": b"\x1f\x8b", "headers": {"content-encoding": "gzip"}}, 415, "unsupported_encoding", ["'gzip'"]),
    "unknown route": ("GET", "/v3/models", lambda g: {}, 404, "unknown_route", ["/v3/models"]),
    "wrong method": ("GET", INFER, lambda g: {}, 405, "method_not_allowed", [INFER]),
    "predict without a file field": (
        "POST", "/predict", lambda g: {"files": {"picture": ("a.jpg", g, "image/jpeg")}}, 400, "bad_request", ["'file'"]),
    "predict as text/plain": (
        "POST", "/predict", lambda g: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media",
        ["'text/plain'"]),
    "predict empty body": (
        "POST", "/predict", lambda g: {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "bad_image", ["empty"]),
    "predict corrupt image": (
        "POST", "/predict", lambda g: {"content": b"garbage" * 50, "headers": {"content-type": "image/jpeg"}}, 400, "bad_image",
        ["the request body", "not an image"]),
    "predict corrupt upload": (
        "POST", "/predict", lambda g: {"files": {"file": ("holiday.jpg", g[: len(g) // 3], "image/jpeg")}}, 400, "bad_image",
        ["holiday.jpg", "truncated"]),
    "predict bad topk": ("POST", "/predict?topk=0", lambda g: {"content": b"x"}, 400, "bad_request", ["top_k"]),
    "predict topk not a number": ("POST", "/predict?topk=three", lambda g: {"content": b"x"}, 400, "bad_request", ["three"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(client, val_files, case):
    method, path, make, status, kind, fragments = BAD_REQUESTS[case]
    response = client.request(method, path, **make(good_jpeg(val_files)))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "kind"} and body["kind"] == kind
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    assert_ready(client)


def test_predict_with_a_unicode_digit_topk_is_a_400(served, client, val_files):
    # A connection of its own: after a 500 uvicorn drops the connection, which the shared client would reuse.
    with httpx.Client(base_url=served[0], timeout=30) as own:
        response = own.post(
            "/predict", params={"topk": "²"}, content=good_jpeg(val_files), headers={"content-type": "image/jpeg"}
        )
    assert response.status_code == 400 and response.json()["kind"] == "bad_request"
    assert_ready(client)


def test_an_internal_error_is_a_json_500_and_the_connection_stays_usable(served, client, val_files, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    import http.client
    from urllib.parse import urlsplit

    monkeypatch.setattr(served[1].model(), "output_tensors", broken)
    body = json.dumps(bytes_request([good_jpeg(val_files)]))
    connection = http.client.HTTPConnection(urlsplit(served[0]).netloc, timeout=30)  # one socket, never reopened by itself
    connection.request("POST", INFER, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 500
    assert json.loads(response.read()) == {"error": "internal error (RuntimeError); the server log has the details", "kind": "internal"}
    monkeypatch.undo()
    sock = connection.sock
    # the same keep-alive connection answers the next request (Starlette's own last resort would drop it)
    connection.request("POST", INFER, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and connection.sock is sock
    response.read()
    connection.close()
    assert_ready(client)


def test_a_good_request_still_works_after_bad_ones(client, classifier, val_files):
    client.post(INFER, content=b"{")
    client.post(INFER, json=bytes_request([b"junk"]))
    out = outputs_by_name(client.post(INFER, json=bytes_request([val_files[0].read_bytes()])))
    np.testing.assert_allclose(as_array(out["probabilities"]), expected(classifier, val_files[:1]).probs, atol=1e-5)


# -- /predict -----------------------------------------------------------------------------------
def assert_top_equal(got: list[dict], want: list[dict]) -> None:
    assert [(e["class"], e["index"]) for e in got] == [(e["class"], e["index"]) for e in want]
    np.testing.assert_allclose([e["prob"] for e in got], [e["prob"] for e in want], atol=1e-5)


def test_predict_multipart_upload(client, classifier, mixed_files):
    for path in mixed_files[:2]:  # a JPEG and a PNG
        response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == MODEL and body["backend"] == "eager"
        assert len(body["top"]) == 3  # topk 5, capped at the 3 classes
        assert_top_equal(body["top"], expected(classifier, [path]).top[0])


def test_predict_raw_body_and_topk(client, classifier, val_files):
    path = val_files[1]
    response = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert_top_equal(response.json()["top"], expected(classifier, [path]).top[0])
    two = client.post("/predict?topk=2", content=path.read_bytes(), headers={"content-type": "image/jpeg"}).json()["top"]
    assert len(two) == 2
    assert_top_equal(two, expected(classifier, [path], 2).top[0])
    one = client.post("/predict?topk=1", files={"file": ("x.jpg", path.read_bytes(), "image/jpeg")}).json()["top"]
    assert len(one) == 1 and one[0]["class"] == expected(classifier, [path]).labels[0][0]


# -- /metrics -----------------------------------------------------------------------------------
def test_metrics_count_requests_errors_images_and_batches(client, val_files):
    before = scrape(client)
    ok = client.post(INFER, json=bytes_request([p.read_bytes() for p in val_files[:2]]))
    assert ok.status_code == 200
    assert client.post(INFER, json=bytes_request([b"junk"])).status_code == 400
    assert client.post(INFER, json=bytes_request([val_files[0].read_bytes()], outputs=[{"name": "nope"}])).status_code == 400
    assert client.post(INFER, json=bytes_request([val_files[0].read_bytes()], outputs=[{"name": "nope"}])).status_code == 400
    assert client.get("/no/such/route").status_code == 404
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("imgrec_requests_total", route=INFER_ROUTE, status="200") == 1
    assert delta("imgrec_requests_total", route=INFER_ROUTE, status="400") == 3
    assert delta("imgrec_requests_total", route="unmatched", status="404") == 1
    assert delta("imgrec_errors_total", kind="bad_image") == 1
    assert delta("imgrec_errors_total", kind="unknown_output") == 2
    assert delta("imgrec_errors_total", kind="unknown_route") == 1
    assert delta("imgrec_images_total") == 2
    assert delta("imgrec_batch_size_count") == 1 and delta("imgrec_batch_size_sum") == 2
    assert delta("imgrec_batch_size_bucket", le="1.0") == 0 and delta("imgrec_batch_size_bucket", le="2.0") == 1
    assert delta("imgrec_request_seconds_count", route=INFER_ROUTE) == 4
    assert sample(after, "imgrec_requests_total", route="/metrics", status="200") >= 1
    assert sample(after, "imgrec_batch_size_count") >= 2  # at least the warm-up batch and this one


# -- dynamic batching -----------------------------------------------------------------------------
class FakeForward:
    """Records the batch sizes it sees; the fake logits of a row are its values summed."""

    def __init__(self, fail_first: int = 0):
        self.sizes: list[int] = []
        self.fail_first = fail_first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(self.sizes) <= self.fail_first:
            raise RuntimeError("the forward failed")
        return x.sum(dim=(1, 2, 3)).unsqueeze(1)


def rows(caller: int, n: int = 1) -> torch.Tensor:
    """``n`` rows [1, 2, 2] whose sums tell the caller and the row: 4 * (100 * caller + row)."""
    return torch.stack([torch.full((1, 2, 2), float(100 * caller + r)) for r in range(n)])


def sums(caller: int, n: int = 1) -> list[list[float]]:
    return [[4.0 * (100 * caller + r)] for r in range(n)]


def run_batcher(scenario, **options):
    """``scenario(batcher)`` run in a fresh event loop, with the batcher started and stopped around it."""
    from imgrec.serve.batcher import DynamicBatcher

    async def main():
        forward = options.pop("forward")
        batcher = DynamicBatcher(forward, **options)
        await batcher.start()
        try:
            return await asyncio.wait_for(scenario(batcher), 30)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batcher_groups_concurrent_requests_into_one_forward():
    forward, seen = FakeForward(), []

    async def scenario(batcher):
        return await asyncio.gather(*(batcher(rows(i)) for i in range(8)))

    results = run_batcher(scenario, forward=forward, max_batch=8, max_wait=0.5, on_batch=lambda n, s: seen.append(n))
    assert forward.sizes == [8] and seen == [8]
    assert [r.tolist() for r in results] == [sums(i) for i in range(8)]


def test_batcher_never_exceeds_max_batch_and_returns_each_callers_rows():
    forward = FakeForward()
    counts = [1, 2, 1, 3, 1, 1, 2, 1, 1]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher(rows(i, n)) for i, n in enumerate(counts)))

    results = run_batcher(scenario, forward=forward, max_batch=3, max_wait=0.5)
    assert max(forward.sizes) <= 3 and sum(forward.sizes) == sum(counts)
    assert len(forward.sizes) >= -(-sum(counts) // 3)
    assert [r.tolist() for r in results] == [sums(i, n) for i, n in enumerate(counts)]


def test_batcher_full_batch_does_not_wait_for_max_wait():
    forward = FakeForward()

    async def scenario(batcher):
        started = time.monotonic()
        await asyncio.gather(*(batcher(rows(i)) for i in range(4)))
        return time.monotonic() - started

    elapsed = run_batcher(scenario, forward=forward, max_batch=4, max_wait=10.0)
    assert forward.sizes == [4] and elapsed < 5.0


def test_batcher_waits_max_wait_for_company():
    """A lone request waits about max_wait; one arriving within it joins the same batch."""
    forward = FakeForward()
    max_wait = 0.3

    async def scenario(batcher):
        started = time.monotonic()
        alone = await batcher(rows(1))
        elapsed = time.monotonic() - started
        first = asyncio.ensure_future(batcher(rows(2)))
        await asyncio.sleep(0.05)
        second = await batcher(rows(3))
        return alone, elapsed, await first, second

    alone, elapsed, first, second = run_batcher(scenario, forward=forward, max_batch=8, max_wait=max_wait)
    assert alone.tolist() == sums(1) and first.tolist() == sums(2) and second.tolist() == sums(3)
    assert max_wait - 0.02 <= elapsed < max_wait + 1.5
    assert forward.sizes == [1, 2]


def test_batcher_forward_error_reaches_its_callers_and_the_batcher_goes_on():
    forward = FakeForward(fail_first=1)

    async def scenario(batcher):
        failed = await asyncio.gather(*(batcher(rows(i)) for i in range(3)), return_exceptions=True)
        after = await asyncio.gather(*(batcher(rows(i)) for i in range(2)))
        return failed, after

    failed, after = run_batcher(scenario, forward=forward, max_batch=8, max_wait=0.05)
    assert all(isinstance(e, RuntimeError) and str(e) == "the forward failed" for e in failed)
    assert [r.tolist() for r in after] == [sums(0), sums(1)]
    assert forward.sizes == [3, 2]


def test_batcher_request_larger_than_max_batch_runs_in_chunks():
    forward = FakeForward()

    async def scenario(batcher):
        return await asyncio.gather(batcher(rows(1, 7)), batcher(rows(2, 1)))

    big, small = run_batcher(scenario, forward=forward, max_batch=3, max_wait=0.05)
    assert big.tolist() == sums(1, 7) and small.tolist() == sums(2)
    assert forward.sizes == [3, 3, 1, 1]


def test_batcher_refuses_bad_settings_and_calls_before_start():
    from imgrec.serve.batcher import DynamicBatcher

    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(FakeForward(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        DynamicBatcher(FakeForward(), max_wait=-1)
    batcher = DynamicBatcher(FakeForward())
    with pytest.raises(RuntimeError, match="not started"):
        asyncio.run(batcher(rows(0)))
    batcher.executor.shutdown()


def test_batcher_survives_inputs_that_cannot_be_batched_together():
    """On a GPU server an FP32 request (kept on the CPU) and an image request (normalised on the
    device) can meet in one batch: here a CPU and a 'meta' tensor stand for them."""
    forward = FakeForward()

    async def scenario(batcher):
        together = await asyncio.wait_for(
            asyncio.gather(batcher(rows(1)), batcher(rows(2).to("meta")), return_exceptions=True), 2
        )
        later = await asyncio.wait_for(batcher(rows(3)), 2)
        return together, later

    async def main():
        from imgrec.serve.batcher import DynamicBatcher

        batcher = DynamicBatcher(forward, max_batch=8, max_wait=0.05)
        await batcher.start()
        try:
            return await scenario(batcher)
        finally:
            with contextlib.suppress(Exception):
                await batcher.stop()

    together, later = asyncio.run(main())
    assert all(isinstance(e, Exception) for e in together)
    assert later.tolist() == sums(3)


def test_batcher_answers_a_forward_with_the_wrong_row_count_with_an_error_and_goes_on():
    calls = []

    def forward(x):
        calls.append(len(x))
        return torch.zeros(len(x) - 1 if len(calls) == 1 else len(x), 2)  # the first call loses a row

    from imgrec.serve.batcher import DynamicBatcher

    async def scenario():
        batcher = DynamicBatcher(forward, max_batch=4, max_wait=0.0)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="1 rows of logits for a batch of 2"):
                await batcher(torch.zeros(2, 3))
            return await asyncio.wait_for(batcher(torch.zeros(3, 3)), 10)
        finally:
            await batcher.stop()

    assert tuple(asyncio.run(scenario()).shape) == (3, 2) and calls == [2, 3]


def test_overload_is_a_503_with_retry_after(classifier, val_files):
    from imgrec.serve import ServeConfig

    with running_server(classifier, ServeConfig(name=MODEL, max_queue=2)) as (base_url, server):
        with httpx.Client(base_url=base_url, timeout=30) as http:
            assert http.post(INFER, json=bytes_request([good_jpeg(val_files)] * 2)).status_code == 200  # at the limit
            server.model().in_flight = 1  # as if another request were being classified
            response = http.post(INFER, json=bytes_request([good_jpeg(val_files)] * 2))
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["kind"] == "overloaded" and "--max-queue" in response.json()["error"]
            server.model().in_flight = 0
            assert http.post(INFER, json=bytes_request([good_jpeg(val_files)])).status_code == 200
            assert server.model().in_flight == 0  # every request gave its images back


def test_server_batches_concurrent_requests(batching_server, classifier, val_files):
    base_url, server = batching_server
    files = val_files[:8]

    async def fire():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            return await asyncio.gather(
                *(http.post(INFER, json=bytes_request([p.read_bytes()], parameters={"top_k": 3})) for p in files)
            )

    with httpx.Client(base_url=base_url, timeout=30) as http:
        before = scrape(http)
        responses = asyncio.run(fire())
        after = scrape(http)
    for path, response in zip(files, responses):  # each caller gets its own image's answer
        out = outputs_by_name(response)
        want = expected(classifier, [path], 3)
        np.testing.assert_allclose(as_array(out["probabilities"]), want.probs, atol=1e-5)
        assert as_array(out["classes"]).tolist() == want.labels
    count = sample(after, "imgrec_batch_size_count") - sample(before, "imgrec_batch_size_count")
    total = sample(after, "imgrec_batch_size_sum") - sample(before, "imgrec_batch_size_sum")
    assert total == 8 and 1 <= count < 8  # some forward pass took more than one image
    assert total / count > 1
    assert (
        sample(after, "imgrec_requests_total", route=INFER_ROUTE, status="200")
        - sample(before, "imgrec_requests_total", route=INFER_ROUTE, status="200")
        == 8
    )


def test_prepare_puts_images_on_the_classifiers_device(tiny_run, val_files):
    """On a GPU ('meta' stands for it here) the uint8 batch must go to the device before normalize, as Classifier.logits does."""
    from imgrec.inference.predict import Classifier
    from imgrec.models.directory import load_model_dir
    from imgrec.serve import ServeConfig
    from imgrec.serve.metrics import Metrics
    from imgrec.serve.model import ServedModel
    from imgrec.serve.protocol import InferRequest

    model, card = load_model_dir(tiny_run[0])
    on_device = Classifier(model, card, device="meta", backend="eager")
    server = ServedModel("m", on_device, ServeConfig(), Metrics())
    try:
        batch = server.prepare(InferRequest("BYTES", images=[val_files[0].read_bytes()]))
    finally:
        server.batcher.executor.shutdown()
    assert batch.device.type == "meta" and tuple(batch.shape) == (1, 3, 32, 32)


# -- backends: choose_backend and ONNX ---------------------------------------------------------
def default_backend(device: torch.device) -> str:
    from imgrec.inference.choice import default_backend as runtime_default

    return runtime_default("auto", device)


def result(backend: str, images_per_s: float, top1_agreement: float) -> SimpleNamespace:
    return SimpleNamespace(backend=backend, images_per_s=images_per_s, top1_agreement=top1_agreement, max_abs_diff=0.0)


def test_choose_backend_without_a_benchmark(tiny_run):
    from imgrec.inference.backends import backend_class
    from imgrec.inference.backends.pytorch import PyTorchBackend
    from imgrec.inference.choice import choose_backend

    run = tiny_run[0]
    assert not (run / "benchmark.json").exists()
    backend, reason = choose_backend(run, torch.device("cpu"))
    assert backend == default_backend(torch.device("cpu")) and issubclass(backend_class(backend), PyTorchBackend)
    assert "imgrec benchmark" in reason and "benchmark.json" in reason
    assert choose_backend(run, torch.device("cpu"), "fp32") == ("channels_last", "--precision fp32")


def test_choose_backend_takes_the_fastest_agreeing_backend(run_copy):
    from imgrec.inference.choice import choose_backend, record_benchmark
    from imgrec.inference.predict import load

    cpu = torch.device("cpu")
    results = [
        result("eager", 100, 100.0),
        result("channels_last", 150, 100.0),
        result("bf16", 900, 98.0),
        result("compile", 200, 99.0),
    ]
    path = record_benchmark(run_copy, results, batch=8)
    assert path == run_copy / "benchmark.json"
    record = json.loads(path.read_text())
    assert record["batch"] == 8 and [r["backend"] for r in record["results"]] == ["eager", "channels_last", "bf16", "compile"]
    backend, reason = choose_backend(run_copy, cpu)
    assert backend == "compile" and "200.0 img/s" in reason and "99.00%" in reason  # bf16 is faster but agrees 98% only

    record_benchmark(
        run_copy, [result("eager", 300, 100.0), result("channels_last", 150, 100.0), result("bf16", 900, 98.9)], batch=8
    )
    assert choose_backend(run_copy, cpu)[0] == "eager"
    classifier = load(run_copy, device="cpu")
    assert classifier.backend == "eager" and classifier.backend_reason.startswith("fastest in benchmark.json")

    record_benchmark(run_copy, [result("bf16", 900, 50.0)], batch=8)
    backend, reason = choose_backend(run_copy, cpu)
    assert backend == default_backend(cpu) and "99% agreement" in reason


def test_choose_backend_needs_the_onnx_files_it_measured(run_copy):
    from imgrec.inference.choice import choose_backend, record_benchmark

    cpu = torch.device("cpu")
    rows = [result("eager", 100, 100.0), result("onnx", 500, 100.0), result("onnx-int8", 800, 99.5)]
    record_benchmark(run_copy, rows, batch=8)
    assert choose_backend(run_copy, cpu)[0] == "eager"  # no ONNX file was there to measure
    (run_copy / "model.onnx").write_bytes(b"stand-in")  # appeared after the benchmark: not the file measured
    assert choose_backend(run_copy, cpu)[0] == "eager"
    (run_copy / "model.int8.onnx").write_bytes(b"measured int8")
    record_benchmark(run_copy, rows, batch=8)  # the benchmark records each file's SHA-256
    assert choose_backend(run_copy, cpu)[0] == "onnx-int8"
    (run_copy / "model.int8.onnx").write_bytes(b"a later export that failed its check")
    backend, reason = choose_backend(run_copy, cpu)
    assert backend == "onnx" and "500.0 img/s" in reason  # the int8 file is not the one measured; fp32's still is


def test_choose_backend_ignores_a_benchmark_of_other_weights_or_device(run_copy):
    from safetensors.torch import load_file, save_file

    from imgrec.inference.choice import choose_backend, record_benchmark, weights_digest

    cpu = torch.device("cpu")
    record_benchmark(run_copy, [result("eager", 100, 100.0)], batch=8)
    assert choose_backend(run_copy, cpu)[0] == "eager"

    meta = torch.device("meta")  # any device but the CPU the benchmark ran on
    backend, reason = choose_backend(run_copy, meta)
    assert backend == default_backend(meta) and "measured on the CPU" in reason

    digest = weights_digest(run_copy)
    weights = run_copy / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights)
    assert weights_digest(run_copy) != digest
    backend, reason = choose_backend(run_copy, cpu)
    assert backend == default_backend(cpu) and "weights changed" in reason and "imgrec benchmark" in reason

    (run_copy / "benchmark.json").write_text("{not json")
    backend, reason = choose_backend(run_copy, cpu)
    assert backend == default_backend(cpu) and "unreadable" in reason


def test_onnx_backend_predicts_what_eager_does(run_copy, classifier, mixed_files):
    from imgrec.inference.choice import choose_backend, record_benchmark
    from imgrec.inference.export import export
    from imgrec.inference.predict import load

    report = export(run_copy, "onnx")
    assert report.path == run_copy / "model.onnx" and report.path.is_file()
    onnx = load(run_copy, device="cpu", backend="onnx")
    assert onnx.backend == "onnx"
    got, want = expected(onnx, mixed_files, 3), expected(classifier, mixed_files, 3)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    assert got.labels == want.labels
    record_benchmark(run_copy, [result("eager", 100, 100.0), result("onnx", 400, 100.0)], batch=8)
    assert choose_backend(run_copy, torch.device("cpu"))[0] == "onnx"
    assert load(run_copy, device="cpu").backend == "onnx"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_over_size_body_is_not_read_to_its_end(classifier, declared):
    """A 413 without reading the rest of a large body: at once where Content-Length says too
    much, else once the bytes read pass the limit by DRAIN_BYTES (a 1 GB body costs the server
    16 MiB of reading, not 1 GB); the connection then closes."""
    from starlette.requests import Request

    from imgrec.serve import ServeConfig
    from imgrec.serve.app import Server
    from imgrec.serve.metrics import Metrics
    from imgrec.serve.protocol import RequestError

    server = Server({}, ServeConfig(max_body_bytes=MAX_BODY), Metrics())
    chunk, total = 16 * 1024, 1 << 30
    pulled = []

    async def receive():
        pulled.append(chunk)
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": len(pulled) * chunk < total}

    headers = [(b"content-length", str(total).encode())] if declared else [(b"transfer-encoding", b"chunked")]
    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}, receive)
    with pytest.raises(RequestError) as caught:
        asyncio.run(server.read_body(request))
    from imgrec.serve.app import DRAIN_BYTES

    assert caught.value.status == 413 and caught.value.kind == "body_too_large" and caught.value.close
    assert len(pulled) == (0 if declared else (MAX_BODY + DRAIN_BYTES) // chunk + 1)


def test_a_padding_batcher_runs_few_shapes_and_drops_the_padding():
    """With pad, the network sees only batch sizes 1, 2, 4 ... max_batch; each caller gets exactly
    its own rows, the padding's never."""
    forward = FakeForward()
    counts = [3, 1, 2, 5, 1, 7]

    async def scenario(batcher):
        answers = []
        for i, n in enumerate(counts):  # one at a time: every request its own batch
            answers.append(await batcher(rows(i, n)))
        return answers

    results = run_batcher(scenario, forward=forward, max_batch=6, max_wait=0.0, pad=True)
    assert set(forward.sizes) <= {1, 2, 4, 6} and forward.sizes == [4, 1, 2, 6, 1, 6, 1]  # 7 images: a chunk of 6, then 1
    assert [r.tolist() for r in results] == [sums(i, n) for i, n in enumerate(counts)]


def test_the_batcher_hands_free_heap_back_at_most_every_few_seconds(monkeypatch):
    """glibc's malloc_trim runs on the inference thread once TRIM_SECONDS have passed since the last, not at every batch."""
    from imgrec.serve import batcher as batcher_module

    calls = []
    monkeypatch.setattr(batcher_module, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    clock = iter(range(0, 1000, 2))  # each reading of the clock 2 s after the last
    monkeypatch.setattr(batcher_module.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(batcher_module, "TRIM_SECONDS", 5.0)
    forward = FakeForward()

    async def scenario(batcher):
        return [batcher._forward_chunks(rows(i, 1)) for i in range(6)]  # as the inference thread calls it, batch by batch

    run_batcher(scenario, forward=forward, max_batch=4, max_wait=0.0)
    assert calls and all(pad == 0 for pad in calls) and len(calls) < 6  # trimmed, but not after every batch
