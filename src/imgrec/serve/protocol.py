"""The KServe Open Inference Protocol (v2) over HTTP: parsing infer requests, encoding responses.

A request carries one input, told apart by its datatype (its name is free):

- ``BYTES`` [N]: N encoded image files (JPEG, PNG, WebP...), the eval resize and crop applied;
  in JSON as base64 strings (or ``{"b64": ...}``), in binary as 4-byte length-prefixed elements;
- ``UINT8`` [N, 3, H, W] or [N, H, W, 3]: RGB pixels of any size, the eval resize and crop applied;
- ``FP32`` [N, 3, S, S]: the model's input as ``imgrec export`` takes it (resized, cropped, normalised).

Outputs, by name: ``probabilities`` (FP32 [N, k]), ``indices`` (INT64 [N, k]), ``classes`` and
``names`` (BYTES [N, k]; names are the human-readable ones where the model has them), ``logits``
(FP32 [N, classes]); k is the request's ``top_k`` parameter (default 5). An output asked for
with the ``classification`` parameter comes as Triton's "value:index:label" strings instead.

The binary tensor extension (what ``tritonclient.http`` sends and asks for by default): the
JSON header's length is in ``Inference-Header-Content-Length``, each binary tensor's size in its
``binary_data_size`` parameter, their bytes follow the header in order. Every problem with a
request is a ``RequestError`` whose message names it; the server answers it with a 4xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTPUTS = ("probabilities", "indices", "classes", "names", "logits")
DEFAULT_OUTPUTS = ("probabilities", "indices", "classes", "names")
NUMPY_TYPES = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64}
MAX_FP32_INPUT = 1e4  # normalised pixels lie within about +-3; far larger values only overflow the network


class RequestError(Exception):
    """A request the server cannot answer: HTTP ``status``, a ``kind`` for the metrics, a message naming the problem."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.message, "kind": self.kind}


@dataclass
class InferRequest:
    datatype: str  # BYTES, UINT8 or FP32
    images: list[bytes] = field(default_factory=list)  # BYTES: encoded files
    names: list[str] = field(default_factory=list)  # what error messages call the images (default input[i])
    array: np.ndarray | None = None  # UINT8 (NCHW after parsing) or FP32
    outputs: list[dict[str, Any]] = field(default_factory=list)  # requested outputs (name, parameters)
    top_k: int = 5
    binary_output: bool = False  # the request's binary_data_output parameter
    id: str | None = None

    @property
    def count(self) -> int:
        return len(self.images) if self.datatype == "BYTES" else int(self.array.shape[0])


def bad(kind: str, message: str, status: int = 400) -> RequestError:
    return RequestError(status, kind, message)


def parse_infer_request(body: bytes, header_length: str | None, *, image_size: int, max_images: int) -> InferRequest:
    """An ``InferRequest`` from an HTTP body (JSON, or JSON + binary tensors)."""
    request, binary = split_body(body, header_length)
    return infer_request_from(request, binary, image_size=image_size, max_images=max_images)


def infer_request_from(request: dict[str, Any], binary: memoryview, *, image_size: int, max_images: int) -> InferRequest:
    """An ``InferRequest`` from the v2 request as JSON (a dict) and the binary data after it: what
    HTTP bodies and gRPC messages (their raw contents as binary data) both come to."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else 0
        raise bad("bad_request", f"'inputs' must hold exactly one tensor (BYTES images, UINT8 pixels or FP32 model input), got {count}")
    tensor = inputs[0]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("bad_shape", f"input 'shape' must be a list of non-negative integers, got {str(shape)[:80]}")
    params = parameters(request, "the request")
    parsed = InferRequest(
        datatype=str(datatype), outputs=parse_outputs(request.get("outputs")), top_k=parse_top_k(params.get("top_k", 5)),
        binary_output=bool(params.get("binary_data_output", False)), id=request.get("id") if isinstance(request.get("id"), str) else None,
    )  # fmt: skip
    size = parameters(tensor, "the input").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise bad("bad_request", f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
    elif "data" not in tensor:
        raise bad("bad_request", "the input has neither 'data' nor a binary_data_size parameter")
    count = shape[0]
    if count == 0:
        raise bad("bad_shape", "the input holds no images (shape[0] is 0)")
    if count > max_images:
        raise bad("too_many_images", f"{count} images in one request, over the limit of {max_images}: split the request", status=413)
    if datatype == "BYTES":
        if len(shape) != 1:
            raise bad("bad_shape", f"a BYTES input holds encoded images with shape [N], got {shape}")
        parsed.images = split_bytes(binary) if size is not None else decode_json_bytes(tensor["data"])
        if len(parsed.images) != count:
            raise bad("bad_shape", f"shape {shape} says {count} images, the data holds {len(parsed.images)}")
        return parsed
    parsed.array = read_array(tensor, datatype, shape, binary if size is not None else None, image_size)
    return parsed


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """(the JSON header as a dict, the binary tensor data after it) of a request body."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise bad("bad_request", f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
        if not 0 < length <= len(body):
            raise bad("bad_request", f"Inference-Header-Content-Length {length} does not fit in the {len(body)}-byte body")
        header, binary = body[:length], memoryview(body)[length:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad("bad_request", f"the request is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise bad("bad_request", "the request must be a JSON object with an 'inputs' list")
    return request, binary


def read_array(tensor: dict[str, Any], datatype: Any, shape: list[int], binary: memoryview | None, image_size: int) -> np.ndarray:
    """The UINT8 pixels (NCHW) or FP32 model input of a tensor, from its binary data or its JSON 'data'."""
    if datatype not in ("UINT8", "FP32"):
        raise bad(
            "bad_dtype",
            f"input datatype {str(datatype)[:20]!r} is not accepted: send BYTES (encoded images), UINT8 [N, 3, H, W] or [N, H, W, 3] pixels, "
            f"or FP32 [N, 3, {image_size}, {image_size}] normalised model input",
        )
    if datatype == "FP32" and shape[1:] != [3, image_size, image_size]:
        raise bad("bad_shape", f"an FP32 input is the normalised model input [N, 3, {image_size}, {image_size}], got {shape}")
    if datatype == "UINT8" and (len(shape) != 4 or 3 not in (shape[1], shape[3]) or 0 in shape):
        raise bad("bad_shape", f"a UINT8 input is RGB pixels [N, 3, H, W] or [N, H, W, 3], got {shape}")
    dtype = NUMPY_TYPES[datatype]
    if binary is not None:
        if len(binary) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise bad("bad_shape", f"{len(binary)} bytes of {datatype} do not make shape {shape} ({math.prod(shape)} values)")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        try:
            array = np.asarray(tensor["data"], dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad("bad_dtype", f"the input's data are not {datatype} numbers: {exc}") from None
        if array.size != math.prod(shape):
            raise bad("bad_shape", f"shape {shape} needs {math.prod(shape)} values, the data holds {array.size}")
        array = array.reshape(shape)
    if datatype == "FP32" and not (np.abs(array) <= MAX_FP32_INPUT).all():  # also catches NaN
        raise bad("bad_value", f"the FP32 input holds values beyond +-{MAX_FP32_INPUT:g}, NaN or infinity: send the normalised model input")
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2) if datatype == "UINT8" and shape[1] != 3 else array)


def parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    value = holder.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("bad_request", f"'parameters' of {what} must be a JSON object, got {str(value)[:40]}")
    return value


def parse_top_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad("bad_request", f"parameter top_k must be a positive integer, got {str(value)[:20]}")
    return value


def parse_outputs(outputs: Any) -> list[dict[str, Any]]:
    if outputs is None:
        return []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad("bad_request", "'outputs' must be a list of objects with a 'name'")
    names = [o.get("name") for o in outputs]
    if len(set(map(str, names))) != len(names):
        raise bad("bad_request", f"'outputs' names an output more than once: {', '.join(map(str, names))[:200]}")
    for output in outputs:
        if output.get("name") not in OUTPUTS:
            raise bad("unknown_output", f"unknown output {str(output.get('name'))[:40]!r}: this model gives {', '.join(OUTPUTS)}")
        classification = parameters(output, f"output {output['name']!r}").get("classification")
        if classification is not None:
            parse_top_k(classification)
    return outputs


def split_bytes(data: memoryview) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise bad("bad_request", "the binary BYTES tensor ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise bad("bad_request", f"a BYTES element of {length} bytes runs past the end of the binary data")
        items.append(bytes(data[offset : offset + length]))
        offset += length
    return items


def decode_json_bytes(data: Any) -> list[bytes]:
    """Base64 strings (or {"b64": ...} objects, as KServe v1 sends) into bytes."""
    if not isinstance(data, list):
        data = [data]
    items = []
    for i, item in enumerate(data):
        text = item.get("b64") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise bad("bad_dtype", f"BYTES element {i} must be a base64 string in JSON (or send binary data)")
        try:
            items.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise bad("bad_request", f"BYTES element {i} is not valid base64") from None
    return items


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def encode_infer_response(
    model: str, request: InferRequest, tensors: dict[str, tuple[str, np.ndarray | list[bytes], list[int]]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: ``tensors`` maps each output name to (datatype, values, shape).

    Outputs go in binary where the request asked for it (per output, or ``binary_data_output``).
    """
    wanted = request.outputs or [{"name": name} for name in DEFAULT_OUTPUTS]
    entries, blobs = [], []
    for output in wanted:
        name, params = output["name"], output.get("parameters") or {}
        datatype, values, shape = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if params.get("binary_data", request.binary_output):
            blob = join_bytes(values) if datatype == "BYTES" else np.ascontiguousarray(values).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode("utf-8", "replace") for v in values] if datatype == "BYTES" else np.asarray(values).ravel().tolist()
        entries.append(entry)
    payload = {"model_name": model, "model_version": "1", "outputs": entries}
    if request.id is not None:
        payload["id"] = request.id
    header = json.dumps(payload).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}


__all__ = ["DEFAULT_OUTPUTS", "InferRequest", "OUTPUTS", "RequestError", "encode_infer_response", "infer_request_from", "join_bytes", "parse_infer_request"]
