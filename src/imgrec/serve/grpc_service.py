"""The Open Inference Protocol v2 over gRPC (KServe's ``grpc_predict_v2.proto``), beside HTTP on
a port of its own (``imgrec serve --grpc-port 8001``): Triton's and KServe's gRPC clients
(``tritonclient.grpc``) work with it.

The messages are those of the protocol's ``GRPCInferenceService``, as the ``tritonclient`` package
generates them (``tritonclient.grpc.service_pb2``; Triton's service is a superset of KServe's):
imgrec answers ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer.
A request becomes the same ``InferRequest`` an HTTP body does (its raw or typed contents as the
binary data), runs through the same dynamic batcher on the HTTP server's event loop, and its
errors come back as gRPC status codes with the HTTP error's message.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from imgrec.serve.protocol import DEFAULT_OUTPUTS, RequestError, infer_request_from, join_bytes

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}
TIMEOUT_S = 120  # one request's wait for the batcher


def grpc_modules() -> tuple[Any, Any, Any]:
    """(grpc, service_pb2, service_pb2_grpc), or an error saying what to install."""
    try:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError as exc:
        raise ValueError(f"--grpc-port needs grpcio and tritonclient's gRPC messages ({exc.name} is missing): pip install 'tritonclient[grpc]'") from None
    return grpc, service_pb2, service_pb2_grpc


def contents_as_binary(tensor: Any, raw: bytes | None) -> bytes:
    """A gRPC input's data as the v2 binary form: its raw contents, or its typed contents packed."""
    if raw is not None:
        return raw
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return join_bytes(list(contents.bytes_contents))
    if tensor.datatype == "UINT8":
        return np.asarray(contents.uint_contents, dtype=np.uint8).tobytes()
    if tensor.datatype == "FP32":
        return np.asarray(contents.fp32_contents, dtype=np.float32).tobytes()
    return b""


def parameter_values(parameters: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter as plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items() if value.WhichOneof("parameter_choice")}


def as_request(message: Any) -> tuple[dict[str, Any], bytes]:
    """(the v2 request as JSON would hold it, its binary data) of a ModelInferRequest."""
    if len(message.inputs) != 1:
        raise RequestError(400, "bad_request", f"'inputs' must hold exactly one tensor (BYTES images, UINT8 pixels or FP32 model input), got {len(message.inputs)}")
    tensor = message.inputs[0]
    raw = message.raw_input_contents[0] if message.raw_input_contents else None
    binary = contents_as_binary(tensor, raw)
    request = {
        "id": message.id or None, "parameters": parameter_values(message.parameters),
        "inputs": [{"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "parameters": {"binary_data_size": len(binary)}}],
        "outputs": [{"name": o.name, "parameters": parameter_values(o.parameters)} for o in message.outputs] or None,
    }  # fmt: skip
    return request, binary


def make_servicer(server: Any, loop: asyncio.AbstractEventLoop, authorised: Any) -> Any:
    """The GRPCInferenceService of ``server`` (an ``imgrec.serve.app.Server``), whose inference runs on ``loop``."""
    grpc, pb, pb_grpc = grpc_modules()

    class Service(pb_grpc.GRPCInferenceServiceServicer):
        def call(self, context: Any, answer: Any) -> Any:
            """``answer()``, its RequestError as the matching status (the key checked first)."""
            try:
                if authorised is not None:
                    authorised(dict(context.invocation_metadata()).get("authorization", ""))
                return answer()
            except RequestError as exc:
                server.metrics.errors.labels(exc.kind).inc()
                context.abort(getattr(grpc.StatusCode, STATUS.get(exc.status, "INVALID_ARGUMENT")), exc.message)

        def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=server.ready)

        def ModelReady(self, request: Any, context: Any) -> Any:
            def answer() -> Any:
                server.model(request.name, request.version)
                return pb.ModelReadyResponse(ready=server.ready)

            return self.call(context, answer)

        def ServerMetadata(self, request: Any, context: Any) -> Any:
            from imgrec import __version__

            return self.call(context, lambda: pb.ServerMetadataResponse(name="imgrec", version=__version__, extensions=["classification"]))

        def ModelMetadata(self, request: Any, context: Any) -> Any:
            def answer() -> Any:
                meta = server.model(request.name, request.version).metadata()
                tensors = [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]]
                outputs = [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]]
                return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"], inputs=tensors, outputs=outputs)

            return self.call(context, answer)

        def ModelInfer(self, request: Any, context: Any) -> Any:
            def answer() -> Any:
                served = server.model(request.model_name, request.model_version)
                body, binary = as_request(request)
                parsed = infer_request_from(body, memoryview(binary), image_size=served.size, max_images=server.config.max_images)
                logits = asyncio.run_coroutine_threadsafe(served.logits(parsed), loop).result(TIMEOUT_S)
                tensors = served.output_tensors(logits, parsed)
                response = pb.ModelInferResponse(model_name=served.name, model_version="1", id=request.id)
                for output in parsed.outputs or [{"name": name} for name in DEFAULT_OUTPUTS]:
                    datatype, values, shape = tensors[output["name"]]
                    response.outputs.add(name=output["name"], datatype=datatype, shape=shape)
                    response.raw_output_contents.append(join_bytes(values) if datatype == "BYTES" else np.ascontiguousarray(values).tobytes())
                return response

            return self.call(context, answer)

    return Service()


def start_grpc(server: Any, loop: asyncio.AbstractEventLoop, host: str, port: int, authorised: Any = None, tls: tuple[str, str] | None = None) -> tuple[Any, int]:
    """A gRPC server for ``server`` listening on ``host:port`` (0: a free port), started: (it, the port)."""
    grpc, _, pb_grpc = grpc_modules()
    limit = server.config.max_body_bytes
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 64 << 20)]
    service = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="imgrec-grpc"), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(server, loop, authorised), service)
    address = f"{host}:{port}"
    if tls is not None:
        key, cert = (open(path, "rb").read() for path in tls)
        bound = service.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = service.add_insecure_port(address)
    if bound == 0:
        raise ValueError(f"--grpc-port {port}: cannot listen on {address} (in use?)")
    service.start()
    return service, bound


__all__ = ["as_request", "make_servicer", "start_grpc"]
