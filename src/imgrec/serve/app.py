"""``imgrec serve RUN``: the model directory behind HTTP (Starlette on uvicorn).

Routes: the Open Inference Protocol v2 (``/v2``, ``/v2/health/live|ready``,
``/v2/models/{name}[/versions/1]``, ``.../ready``, ``.../infer``; see ``imgrec.serve.protocol``),
``POST /predict`` (a multipart upload in field ``file``, or a raw image body: top-k JSON, for
curl), ``GET /`` (a page to drop an image on and see the top-5 as bars) and ``GET /metrics``
(Prometheus). Images are decoded and cropped on worker threads; the network runs in dynamic
batches (``imgrec.serve.batcher``). Every bad request is answered with a 4xx JSON error naming
the problem, and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hmac
import html
import io
import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from imgrec.config import ServeConfig
from imgrec.data.decode import BadImageError, EncodedImage, TooManyPixelsError, load_sample
from imgrec.inference.predict import Classifier, load
from imgrec.inference.search import Index
from imgrec.serve.batcher import DynamicBatcher
from imgrec.serve.metrics import Metrics, MetricsMiddleware
from imgrec.serve.protocol import InferRequest, RequestError, bad, encode_infer_response, parse_infer_request, parse_top_k

log = logging.getLogger("imgrec.serve")


class Server:
    """The state behind the routes: the classifier, its batcher, the metrics."""

    def __init__(self, classifier: Classifier, config: ServeConfig, index: Index | None = None, grpc: dict[str, Any] | None = None, authorised: Any = None):
        self.classifier, self.config, self.index = classifier, config, index
        self.grpc_options, self.authorised = grpc, authorised
        self.grpc_server, self.grpc_port = None, None
        self.size = classifier.card.img_size
        self.metrics = Metrics()
        self.batcher = DynamicBatcher(
            classifier.forward, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000, on_batch=self.metrics.observe_batch
        )
        self.ready = False
        self.in_flight = 0  # images between decoding and their answer
        self.explaining = threading.Lock()  # /explain and /search: one at a time, on a copy of the model of their own
        self._analysis_model: torch.nn.Module | None = None
        self.page_html = resources.files("imgrec.serve").joinpath("page.html").read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(config.name))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        await self.batcher.start()
        for batch in sorted({1, self.config.max_batch}):  # first calls allocate (and compile has both shapes to build): not a client's wait
            await self.batcher(torch.zeros(batch, 3, self.size, self.size, device=self.classifier.device))
        if self.grpc_options is not None:
            from imgrec.serve.grpc_service import start_grpc

            options = self.grpc_options
            self.grpc_server, self.grpc_port = start_grpc(self, asyncio.get_running_loop(), options.get("host", "127.0.0.1"), options["port"], self.authorised, options.get("tls"))
            log.info("gRPC (Open Inference Protocol v2) on port %d", self.grpc_port)
        self.ready = True
        log.info("serving %s as %r with backend %s", self.classifier.card.architecture, self.config.name, self.classifier.backend)
        try:
            yield
        finally:
            self.ready = False
            if self.grpc_server is not None:
                self.grpc_server.stop(grace=2).wait()
            await self.batcher.stop()

    def analysis_model(self) -> torch.nn.Module:
        """A copy of the PyTorch model for /explain and /search (hold ``explaining``): their hooks and
        backward passes never touch the module the batcher runs."""
        if self._analysis_model is None:
            self._analysis_model = copy.deepcopy(self.classifier.model).float().eval()
        return self._analysis_model

    # -- inputs -------------------------------------------------------------------------------
    def check_resized_pixels(self, name: str, height: int, width: int) -> None:
        """Refuse an image whose eval resize (shorter side to img_size / crop_pct) would exceed the pixel limit:
        a 1 x 1,000,000 strip has few pixels but would be resized to hundreds of millions."""
        short, long = sorted((max(1, height), max(1, width)))
        side = self.size / float(self.classifier.card.data_config.crop_pct)
        resized = side * side * long / short
        if resized > self.config.max_pixels:
            raise bad(
                "too_many_pixels",
                f"{name}: {width}x{height} would be resized to {resized:,.0f} pixels, over this server's limit of "
                f"{self.config.max_pixels:,}: crop it nearer to square",
                413,
            )

    def decode(self, name: str, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
        except Exception:  # not an image: load_sample says why
            pass
        else:
            self.check_resized_pixels(name, height, width)
        try:
            return load_sample(EncodedImage(name, data), self.classifier.transform, self.config.max_pixels)
        except TooManyPixelsError as exc:
            raise bad("too_many_pixels", f"{name}: {exc.reason} (this server's limit: {self.config.max_pixels:,} pixels)", 413) from None
        except BadImageError as exc:
            raise bad("bad_image", f"{name}: {exc.reason}") from None

    def prepare(self, request: InferRequest) -> torch.Tensor:
        """The normalised float batch of a parsed request (runs on a worker thread)."""
        device = self.classifier.device
        if request.datatype == "FP32":
            return torch.from_numpy(request.array.copy()).to(device)
        if request.datatype == "BYTES":
            names = request.names or [f"input[{i}]" for i in range(len(request.images))]
            images = [self.decode(name, data) for name, data in zip(names, request.images)]
        else:
            pixels = request.array.shape[2] * request.array.shape[3]
            if pixels > self.config.max_pixels:
                raise bad("too_many_pixels", f"UINT8 images of {pixels:,} pixels, over this server's limit of {self.config.max_pixels:,}", 413)
            self.check_resized_pixels("input", *request.array.shape[2:])
            pixels_in = torch.from_numpy(np.array(request.array))  # a writable copy: the request's buffer is read-only
            images = [self.classifier._prepare(f"input[{i}]", image) for i, image in enumerate(pixels_in)]
            failed = next((p for p in images if not isinstance(p, torch.Tensor)), None)
            if failed is not None:
                raise bad("bad_image", f"{failed.source}: {failed.error}")
        with torch.inference_mode():  # uint8 travels to the GPU, a quarter of float's bytes
            return self.classifier.normalize(torch.stack(images).to(device)).float()

    async def read_body(self, request: Request) -> bytes:
        """The request body, or a 413: at once where Content-Length declares more than the limit
        (a client that sent ``Expect: 100-continue``, as curl does for large bodies, never sends
        it), else as soon as the bytes read pass it; the rest is not read (the 413 closes the
        connection)."""
        limit = self.config.max_body_bytes
        if request.headers.get("content-encoding", "identity") != "identity":
            raise bad("unsupported_encoding", f"Content-Encoding {request.headers['content-encoding']!r} is not accepted: send the body uncompressed", 415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise bad("body_too_large", f"request body of {int(declared):,} bytes, over this server's limit of {limit:,} (imgrec serve --max-body-mb)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise bad("body_too_large", f"request body of more than {limit:,} bytes (at least {size:,}), over this server's limit (imgrec serve --max-body-mb)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def logits(self, request: InferRequest) -> torch.Tensor:
        if self.in_flight + request.count > self.config.max_queue:
            raise RequestError(503, "overloaded", f"{self.in_flight} images are being classified, the most this server queues is "
                               f"{self.config.max_queue} (--max-queue): retry in a moment")  # fmt: skip
        self.in_flight += request.count
        try:
            inputs = await run_in_threadpool(self.prepare, request)
            self.metrics.images.inc(len(inputs))
            return await self.batcher(inputs)
        finally:
            self.in_flight -= request.count

    def check_model(self, request: Request) -> None:
        self.check_name(request.path_params["name"], request.path_params.get("version", "1"))

    def check_name(self, name: str, version: str) -> None:
        """A 404 unless ``name`` and ``version`` (empty: the latest) are this server's model."""
        version = version or "1"
        if name != self.config.name or version != "1":
            raise bad("unknown_model", f"no model {name!r} version {version!r} here: this server has {self.config.name!r} version '1'", 404)

    # -- routes -------------------------------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        from imgrec import __version__

        return JSONResponse({"name": "imgrec", "version": __version__, "extensions": ["binary_tensor_data", "classification"]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse({"name": self.config.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse(self.metadata())

    def metadata(self) -> dict[str, Any]:
        """The model's v2 metadata: inputs, outputs and what the server knows of its preprocessing (HTTP and gRPC)."""
        data, size, classes = self.classifier.card.data_config, self.size, len(self.classifier.classes)
        return {
            "name": self.config.name, "versions": ["1"], "platform": f"imgrec/{self.classifier.backend}",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, -1, -1]},
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}, {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "classes", "datatype": "BYTES", "shape": [-1, -1]}, {"name": "names", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            ],
            "parameters": {
                "architecture": self.classifier.card.architecture, "classes": self.classifier.classes, "img_size": size, "crop_pct": data.crop_pct,
                "mean": list(data.mean), "std": list(data.std), "interpolation": data.interpolation, "top_k": 5,
                "max_batch": self.config.max_batch, "max_images": self.config.max_images, "max_pixels": self.config.max_pixels,
                "max_body_bytes": self.config.max_body_bytes, "one_input": "send exactly one of the inputs; its datatype says which",
            },
        }  # fmt: skip

    async def infer(self, request: Request) -> Response:
        self.check_model(request)
        body = await self.read_body(request)
        parsed = await run_in_threadpool(  # a large JSON body takes a while: not on the event loop
            parse_infer_request, body, request.headers.get("inference-header-content-length"), image_size=self.size, max_images=self.config.max_images
        )
        logits = await self.logits(parsed)
        content, headers = await run_in_threadpool(lambda: encode_infer_response(self.config.name, parsed, self.output_tensors(logits, parsed)))
        return Response(content, headers=headers)

    def output_tensors(self, logits: torch.Tensor, request: InferRequest) -> dict[str, tuple[str, Any, list[int]]]:
        classes, n = self.classifier.classes, len(logits)
        rows = self.classifier.rank(logits, request.top_k, [""] * n)
        k = len(rows[0].labels)
        tensors: dict[str, tuple[str, Any, list[int]]] = {
            "probabilities": ("FP32", np.array([r.probs for r in rows], dtype=np.float32), [n, k]),
            "indices": ("INT64", np.array([r.indices for r in rows], dtype=np.int64), [n, k]),
            "classes": ("BYTES", [c.encode() for r in rows for c in r.labels], [n, k]),
            "names": ("BYTES", [c.encode() for r in rows for c in (r.names or r.labels)], [n, k]),
            "logits": ("FP32", logits.numpy().astype(np.float32), [n, len(classes)]),
        }
        for output in request.outputs:  # Triton's classification extension: "value:index:label" strings
            count = (output.get("parameters") or {}).get("classification")
            if count:
                source = logits if output["name"] == "logits" else self.classifier.probabilities(logits)
                top_values, top_indices = source.topk(min(count, len(classes)), dim=1)
                strings = [f"{v:f}:{i}:{classes[i]}".encode() for v, i in zip(top_values.flatten().tolist(), top_indices.flatten().tolist())]
                tensors[output["name"]] = ("BYTES", strings, [n, top_values.shape[1]])
        return tensors

    async def predict(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/predict`` (or the image as the raw body): the top-k classes as JSON."""
        k = count_parameter(request, "topk", "5")
        name, data = await self.uploaded_image(request)
        logits = await self.logits(InferRequest("BYTES", images=[data], names=[name], top_k=k))
        ranked = self.classifier.rank(logits, k, [name])[0].to_dict()
        return JSONResponse({"model": self.config.name, "backend": self.classifier.backend, "top": ranked["top"]})

    async def explain(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/explain[?class=NAME]``: a PNG of the image as the model sees it
        with the Grad-CAM heatmap of its top class (or NAME) over it; the class (percent-encoded),
        its index and its probability in the X-Class, X-Class-Index and X-Probability headers. One at a time: a backward pass is a training step's cost."""
        from imgrec.inference.explain import explain, png_bytes

        name, data = await self.uploaded_image(request)
        wanted = request.query_params.get("class")
        if wanted is not None and wanted not in self.classifier.classes:
            raise bad("bad_request", f"query parameter class must be one of the model's classes, got {wanted[:40]!r}")

        def work() -> tuple[bytes, dict[str, Any]]:
            image = self.decode(name, data)
            with self.explaining:
                row = explain(self.classifier, [image], wanted, model=self.analysis_model())[0]
            return png_bytes(row["overlay"]), row

        self.metrics.images.inc()
        png, row = await run_in_threadpool(work)
        headers = {"X-Class": quote(row["class"]), "X-Class-Index": str(row["index"]), "X-Probability": f"{row['prob']:.6f}"}  # headers are latin-1: the name percent-encoded
        return Response(png, media_type="image/png", headers=headers)

    async def search(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/search?k=10``: the indexed images most like the one sent, with their cosine similarity."""
        from imgrec.inference.search import embed

        if self.index is None:
            raise bad("no_index", "this server has no index: start it with --index DIR (made by imgrec index RUN --data DIR)", 404)
        count = count_parameter(request, "k", "10")
        name, data = await self.uploaded_image(request)

        def work() -> list[tuple[str, float]]:
            image = self.decode(name, data)
            with self.explaining:
                query = embed(self.classifier, [image], model=self.analysis_model())
            return self.index.nearest(query, count)[0]

        self.metrics.images.inc()
        neighbours = await run_in_threadpool(work)
        return JSONResponse({"model": self.config.name, "neighbours": [{"file": f, "similarity": s} for f, s in neighbours]})

    async def uploaded_image(self, request: Request) -> tuple[str, bytes]:
        """(name, bytes) of the one image of a /predict or /explain request: a multipart field
        ``file`` or the image as the body."""
        body = await self.read_body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            name, data = await self.uploaded_file(request, body)
        elif kind.startswith("image/") or kind in ("application/octet-stream", ""):
            name, data = "the request body", body
        else:
            raise bad("unsupported_media", f"Content-Type {kind!r} is not accepted: upload multipart/form-data with field 'file', or the image itself", 415)
        if not data:
            raise bad("bad_image", f"{name}: empty file (0 bytes)")
        return name, data

    async def uploaded_file(self, request: Request, body: bytes) -> tuple[str, bytes]:
        """(file name, bytes) of the multipart field ``file``."""
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
        except MultiPartException as exc:
            raise bad("bad_request", f"the multipart body cannot be read: {exc.message}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad("bad_request", "no file in multipart field 'file': upload with curl -F file=@image.jpg")
            return upload.filename or "the uploaded file", await upload.read()
        finally:
            await form.close()

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.page_html)

    async def metrics_text(self, request: Request) -> Response:
        content, content_type = self.metrics.render()
        return Response(content, media_type=content_type)


def count_parameter(request: Request, name: str, default: str) -> int:
    """The positive integer of query parameter ``name`` (``?topk=5``), or a 400 naming it."""
    text = request.query_params.get(name, default)
    try:
        return parse_top_k(int(text))
    except ValueError:
        raise bad("bad_request", f"query parameter {name} must be a positive integer, got {text[:20]!r}") from None


def server_routes(server: Server) -> list[Route]:
    """The page, /predict, /explain, /metrics and the Open Inference Protocol v2 routes (each
    model route also under its version)."""
    routes = [
        Route("/", server.page),
        Route("/v2", server.server_metadata),
        Route("/v2/health/live", server.live),
        Route("/v2/health/ready", server.server_ready),
        Route("/predict", server.predict, methods=["POST"]),
        Route("/explain", server.explain, methods=["POST"]),
        Route("/search", server.search, methods=["POST"]),
        Route("/metrics", server.metrics_text),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, server.model_metadata),
            Route(prefix + "/ready", server.model_ready),
            Route(prefix + "/infer", server.infer, methods=["POST"]),
        ]
    return routes


OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready"})  # no key needed: the page and the health checks


def key_checker(api_keys: list[str] | None):
    """A check of an Authorization header's value (HTTP's, or gRPC's ``authorization`` metadata)
    that raises a 401 unless it is ``Bearer KEY`` with one of ``api_keys`` (compared in constant
    time); None where no key is set."""
    keys = [key.encode() for key in api_keys or [] if key]
    if not keys:
        return None

    def check(authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(given, key) for key in keys]):  # every key compared: no early exit
            raise RequestError(401, "unauthorized", "this server needs an API key: send the header Authorization: Bearer KEY")

    return check


def create_app(
    classifier: Classifier, config: ServeConfig | None = None, index: Index | None = None, api_keys: list[str] | None = None,
    grpc: dict[str, Any] | None = None,
) -> Starlette:  # fmt: skip
    """The ASGI application serving ``classifier`` (run it with uvicorn, or ``serve``); with
    ``index`` (``imgrec.inference.search.Index``), ``/search`` answers from it; with ``api_keys``,
    every route but the page and the health checks needs one of them as a bearer token; with
    ``grpc`` ({"host", "port", "tls": (key, cert) or None}), the v2 protocol over gRPC starts with
    the app (``imgrec.serve.grpc_service``; its port in ``app.state.server.grpc_port``)."""
    if index is not None:
        index.check(classifier)
    authorised = key_checker(api_keys)
    server = Server(classifier, config or ServeConfig(), index, grpc=grpc, authorised=authorised)

    def guarded(endpoint):
        """``endpoint`` behind the key check, answering an unexpected exception with a JSON 500, logged, keeping the connection
        (Starlette's last-resort handler re-raises, and uvicorn then drops the connection)."""

        @functools.wraps(endpoint)
        async def call(request: Request) -> Response:
            try:
                if authorised is not None and request.url.path not in OPEN_PATHS:
                    authorised(request.headers.get("authorization", ""))
                return await endpoint(request)
            except (RequestError, HTTPException, ClientDisconnect):
                raise
            except Exception as exc:
                log.exception("error answering %s %s", request.method, request.url.path)
                server.metrics.errors.labels("internal").inc()
                return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details", "kind": "internal"}, status_code=500)

        return call

    routes = [Route(r.path, guarded(r.endpoint), methods=r.methods) for r in server_routes(server)]

    async def request_error(request: Request, exc: RequestError) -> Response:
        server.metrics.errors.labels(exc.kind).inc()
        headers = {503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": 'Bearer realm="imgrec"'}}.get(exc.status)
        if exc.kind == "body_too_large":
            headers = {"Connection": "close"}  # the body's rest is not read
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        server.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}", "kind": kind}, status_code=exc.status_code)

    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        server.metrics.errors.labels("client_disconnected").inc()
        return Response(status_code=499)  # nobody reads it

    app = Starlette(
        routes=routes, lifespan=server.lifespan,
        exception_handlers={RequestError: request_error, HTTPException: http_error, ClientDisconnect: client_gone},
    )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)
    app.state.server = server
    return app


def serve(
    run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", backend: str = "auto", config: ServeConfig | None = None,
    access_log: bool = False, tta: str | None = None, index: str | Path | None = None, api_keys: list[str] | None = None,
    ssl_keyfile: str | None = None, ssl_certfile: str | None = None, grpc_port: int | None = None,
) -> None:  # fmt: skip
    """Load the model directory ``run`` and serve it until interrupted (``tta``: test-time
    augmentation, ``imgrec.data.tta``; ``api_keys``: see ``create_app``; ``ssl_keyfile`` and
    ``ssl_certfile``: HTTPS through uvicorn, and TLS on gRPC; ``grpc_port``: the v2 protocol over gRPC there too)."""
    import uvicorn

    classifier = load(run, device=device, backend=backend, tta=tta)
    print(f"imgrec serve: {run} as model {(config or ServeConfig()).name!r}, backend {classifier.backend} ({classifier.backend_reason})", flush=True)
    found = Index(index) if index is not None else None
    uvicorn.run(
        create_app(classifier, config, found, api_keys, grpc={"host": host, "port": grpc_port, "tls": (ssl_keyfile, ssl_certfile) if ssl_keyfile else None} if grpc_port is not None else None),
        host=host, port=port, access_log=access_log, log_level="info", timeout_keep_alive=30,
        ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
    )  # fmt: skip


__all__ = ["ServeConfig", "Server", "create_app", "serve"]
