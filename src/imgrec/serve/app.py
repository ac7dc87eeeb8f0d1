"""``imgrec serve RUN [RUN ...]``: model directories behind HTTP (Starlette on uvicorn).

Routes: the Open Inference Protocol v2 (``/v2``, ``/v2/health/live|ready``,
``/v2/models/{name}[/versions/1]``, ``.../ready``, ``.../infer``; see ``imgrec.serve.protocol``)
with its model repository extension (``POST /v2/repository/index``,
``/v2/repository/models/{name}/load|unload``), ``POST /predict``, ``/explain`` and ``/search``
(a multipart upload in field ``file``, or a raw image body; ``?model=NAME``, else the first
model), ``GET /`` (a page to drop an image on and see the top-5 as bars) and ``GET /metrics``
(Prometheus). Each model (``imgrec.serve.model.ServedModel``) decodes and crops on worker threads
and runs the network in dynamic batches of its own (``imgrec.serve.batcher``). Every bad request
is answered with a 4xx JSON error naming the problem, and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import html
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from imgrec.config import ServeConfig
from imgrec.inference.predict import Classifier, load
from imgrec.inference.search import Index
from imgrec.serve.metrics import Metrics, MetricsMiddleware
from imgrec.serve.model import ServedModel
from imgrec.serve.protocol import InferRequest, RequestError, bad, encode_infer_response, parse_infer_request, parse_top_k

log = logging.getLogger("imgrec.serve")


class Server:
    """The state behind the routes: the models served (each a ``ServedModel``), the metrics, the
    repository of model directories that ``/v2/repository/models/NAME/load`` may (re)load."""

    def __init__(
        self, models: dict[str, ServedModel], config: ServeConfig, metrics: Metrics, *, repository: dict[str, Path] | None = None,
        failed: dict[str, str] | None = None, loader: Any = None, grpc: dict[str, Any] | None = None, authorised: Any = None,
    ):  # fmt: skip
        self.models, self.config, self.metrics = dict(models), config, metrics
        self.repository = dict(repository or {})  # name -> model directory: what load and unload may name
        self.failed = dict(failed or {})  # name -> why it does not serve (failed to load, or unloaded)
        self.loader = loader  # model directory -> Classifier, for load
        self.default = next(iter(models), None)  # the model of /predict, /explain, /search and the page without ?model=
        self.grpc_options, self.authorised = grpc, authorised
        self.grpc_server, self.grpc_port = None, None
        self.ready = False
        self.changing = asyncio.Lock()  # one load or unload at a time
        self.page_html = resources.files("imgrec.serve").joinpath("page.html").read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(self.default or config.name))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        for served in self.models.values():
            await served.start()
        if self.grpc_options is not None:
            from imgrec.serve.grpc_service import start_grpc

            options = self.grpc_options
            self.grpc_server, self.grpc_port = start_grpc(self, asyncio.get_running_loop(), options.get("host", "127.0.0.1"), options["port"], self.authorised, options.get("tls"))
            log.info("gRPC (Open Inference Protocol v2) on port %d", self.grpc_port)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            if self.grpc_server is not None:
                self.grpc_server.stop(grace=2).wait()
            for served in list(self.models.values()):
                await served.stop()

    def model(self, name: str | None = None, version: str = "") -> ServedModel:
        """The model served as ``name`` (None: the default) at ``version`` ("" or "1"), or a 404 saying what there is."""
        name = self.default if name is None else name
        version = version or "1"
        if name in self.models and version == "1":
            return self.models[name]
        here = ", ".join(repr(n) for n in self.models) or "none"
        why = f" ({self.failed[name]})" if name in self.failed else ""
        raise bad("unknown_model", f"no model {name!r} version {version!r} here{why}: this server has {here}, version '1'", 404)

    async def read_body(self, request: Request) -> bytes:
        """The request body, or a 413. A body over the limit by at most DRAIN_BYTES is read to its
        end and dropped, so that a client still sending hears the 413 on a connection that stays
        open; a larger one is not read further (at once where its Content-Length says so; a
        client that sent ``Expect: 100-continue``, as curl does for large bodies, never sends it)
        and the 413 closes the connection."""
        limit = self.config.max_body_bytes
        if request.headers.get("content-encoding", "identity") != "identity":
            raise bad("unsupported_encoding", f"Content-Encoding {request.headers['content-encoding']!r} is not accepted: send the body uncompressed", 415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
            raise too_large(f"request body of {int(declared):,} bytes, over this server's limit of {limit:,} (imgrec serve --max-body-mb)", close=True)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit + DRAIN_BYTES:
                raise too_large(f"request body of more than {limit:,} bytes (at least {size:,}), over this server's limit (imgrec serve --max-body-mb)", close=True)
        if size > limit:
            raise too_large(f"request body of {size:,} bytes, over this server's limit of {limit:,} (imgrec serve --max-body-mb)", close=False)
        return b"".join(chunks)

    def path_model(self, request: Request) -> ServedModel:
        return self.model(request.path_params["name"], request.path_params.get("version", "1"))

    # -- routes -------------------------------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        from imgrec import __version__

        return JSONResponse({"name": "imgrec", "version": __version__, "extensions": ["binary_tensor_data", "classification"]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_ready(self, request: Request) -> Response:
        served = self.path_model(request)
        return JSONResponse({"name": served.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(self.path_model(request).metadata())

    async def infer(self, request: Request) -> Response:
        served = self.path_model(request)
        body = await self.read_body(request)
        parsed = await run_in_threadpool(  # a large JSON body takes a while: not on the event loop
            parse_infer_request, body, request.headers.get("inference-header-content-length"), image_size=served.size, max_images=self.config.max_images
        )
        logits = await served.logits(parsed)
        content, headers = await run_in_threadpool(lambda: encode_infer_response(served.name, parsed, served.output_tensors(logits, parsed)))
        return Response(content, headers=headers)

    def query_model(self, request: Request) -> ServedModel:
        """The model ``?model=NAME`` names (/predict, /explain, /search), or the default one."""
        return self.model(request.query_params.get("model"))

    async def predict(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/predict[?model=NAME]`` (or the image as the raw body): the top-k classes as JSON."""
        served = self.query_model(request)
        k = count_parameter(request, "topk", "5")
        name, data = await self.uploaded_image(request)
        logits = await served.logits(InferRequest("BYTES", images=[data], names=[name], top_k=k))
        ranked = served.classifier.rank(logits, k, [name])[0].to_dict()
        return JSONResponse({"model": served.name, "backend": served.classifier.backend, "top": ranked["top"]})

    async def explain(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/explain[?class=NAME][&model=NAME]``: a PNG of the image as the model sees it
        with the Grad-CAM heatmap of its top class (or NAME) over it; the class (percent-encoded),
        its index and its probability in the X-Class, X-Class-Index and X-Probability headers. One at a time: a backward pass is a training step's cost."""
        from imgrec.inference.explain import explain, png_bytes

        served = self.query_model(request)
        name, data = await self.uploaded_image(request)
        wanted = request.query_params.get("class")
        if wanted is not None and wanted not in served.classifier.classes:
            raise bad("bad_request", f"query parameter class must be one of the model's classes, got {wanted[:40]!r}")

        def work() -> tuple[bytes, dict[str, Any]]:
            image = served.decode(name, data)
            with served.explaining:
                row = explain(served.classifier, [image], wanted, model=served.analysis_model())[0]
            return png_bytes(row["overlay"]), row

        self.metrics.images.inc()
        png, row = await run_in_threadpool(work)
        headers = {"X-Class": quote(row["class"]), "X-Class-Index": str(row["index"]), "X-Probability": f"{row['prob']:.6f}"}  # headers are latin-1: the name percent-encoded
        return Response(png, media_type="image/png", headers=headers)

    async def search(self, request: Request) -> Response:
        """``curl -F file=@cat.jpg HOST/search?k=10``: the indexed images most like the one sent, with their cosine similarity."""
        from imgrec.inference.search import embed

        served = self.query_model(request)
        if served.index is None:
            raise bad("no_index", f"model {served.name!r} has no index here: start the server with --index DIR (made by imgrec index RUN --data DIR)", 404)
        count = count_parameter(request, "k", "10")
        name, data = await self.uploaded_image(request)

        def work() -> list[tuple[str, float]]:
            image = served.decode(name, data)
            with served.explaining:
                query = embed(served.classifier, [image], model=served.analysis_model())
            return served.index.nearest(query, count)[0]

        self.metrics.images.inc()
        neighbours = await run_in_threadpool(work)
        return JSONResponse({"model": served.name, "neighbours": [{"file": f, "similarity": s} for f, s in neighbours]})

    # -- the model repository extension ----------------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        """``POST /v2/repository/index``: every model this server knows, with its state."""
        names = list(dict.fromkeys([*self.repository, *self.models, *self.failed]))
        rows = []
        for name in names:
            row = {"name": name, "version": "1", "state": "READY" if name in self.models else "UNAVAILABLE"}
            if name in self.failed and name not in self.models:
                row["reason"] = self.failed[name]
            rows.append(row)
        return JSONResponse(rows)

    async def repository_load(self, request: Request) -> Response:
        """``POST /v2/repository/models/NAME/load``: (re)load NAME from its model directory; the
        model it replaces serves until the new one is ready."""
        name = request.path_params["name"]
        if name not in self.repository or self.loader is None:
            raise bad("unknown_model", f"no model {name!r} in this server's repository: it knows {', '.join(map(repr, self.repository)) or 'none'}", 404)
        async with self.changing:
            try:
                classifier = await run_in_threadpool(self.loader, self.repository[name])
                index, note = await run_in_threadpool(self.kept_index, name, classifier)  # hashes the weights: not on the event loop
                fresh = ServedModel(name, classifier, self.config, self.metrics, self.repository[name], index)
                await fresh.start()
            except Exception as exc:  # a model that does not load is reported; the others serve on
                self.failed[name] = f"load failed: {type(exc).__name__}: {exc}"[:500]
                raise bad("load_failed", f"model {name!r} did not load from {self.repository[name]}: {exc}"[:500], 400) from None
            old = self.models.get(name)
            self.models[name] = fresh
            self.failed.pop(name, None)
            self.default = self.default or name
            if old is not None:
                await old.stop()
        return JSONResponse({"name": name, "state": "READY"} | ({"index": note} if note else {}))

    def kept_index(self, name: str, classifier: Classifier) -> tuple[Index | None, str | None]:
        """The search index NAME served before a reload, if it still fits the reloaded weights, and
        a note when it does not (the reload goes on without it: /search answers that there is none)."""
        old = self.models.get(name)
        if old is None or old.index is None:
            return None, None
        try:
            old.index.check(classifier)
        except ValueError as exc:
            return None, f"dropped: {exc}"
        return old.index, None

    async def repository_unload(self, request: Request) -> Response:
        """``POST /v2/repository/models/NAME/unload``: stop serving NAME (load brings it back)."""
        name = request.path_params["name"]
        async with self.changing:
            served = self.model(name)
            del self.models[name]
            self.failed[name] = "unloaded"
            if self.default == name:
                self.default = next(iter(self.models), None)
            await served.stop()
        return JSONResponse({"name": name, "state": "UNAVAILABLE"})

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


DRAIN_BYTES = 16 << 20  # an over-size body is read and dropped up to this much past the limit, so the client hears the 413


def too_large(message: str, *, close: bool) -> RequestError:
    """A 413 ``body_too_large``; ``close``: the body's rest was not read, so the connection closes after it."""
    error = bad("body_too_large", message, 413)
    error.close = close
    return error


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
    routes += [
        Route("/v2/repository/index", server.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", server.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", server.repository_unload, methods=["POST"]),
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


def error_handlers(metrics: Metrics) -> dict[type, Any]:
    """JSON answers for the errors a route raises (counted by kind): ours, Starlette's, a client gone."""

    async def request_error(request: Request, exc: RequestError) -> Response:
        metrics.errors.labels(exc.kind).inc()
        headers = {503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": 'Bearer realm="imgrec"'}}.get(exc.status)
        if getattr(exc, "close", False):
            headers = {"Connection": "close"}  # the body's rest was not read
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}", "kind": kind}, status_code=exc.status_code)

    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        metrics.errors.labels("client_disconnected").inc()
        return Response(status_code=499)  # nobody reads it

    return {RequestError: request_error, HTTPException: http_error, ClientDisconnect: client_gone}


def create_app(
    classifier: Classifier | dict[str, Classifier], config: ServeConfig | None = None, index: Index | None = None, api_keys: list[str] | None = None,
    grpc: dict[str, Any] | None = None, repository: dict[str, Path] | None = None, failed: dict[str, str] | None = None, loader: Any = None,
) -> Starlette:  # fmt: skip
    """The ASGI application serving ``classifier`` as ``config.name``, or each of a {name:
    classifier} dict under its name (run it with uvicorn, or ``serve``). With ``index``
    (``imgrec.inference.search.Index``), ``/search`` answers from it for the first model; with
    ``api_keys``, every route but the page and the health checks needs one of them as a bearer
    token; with ``grpc`` ({"host", "port", "tls": (key, cert) or None}), the v2 protocol over gRPC
    starts with the app (``imgrec.serve.grpc_service``; its port in ``app.state.server.grpc_port``).
    ``repository`` ({name: model directory}) and ``loader`` (directory -> Classifier) make the v2
    repository extension's load and unload work; ``failed`` ({name: reason}) lists the models
    that did not load."""
    config = config or ServeConfig()
    classifiers = classifier if isinstance(classifier, dict) else {config.name: classifier}
    metrics = Metrics()
    models = {
        name: ServedModel(name, c, config, metrics, (repository or {}).get(name), index if i == 0 else None) for i, (name, c) in enumerate(classifiers.items())
    }  # fmt: skip
    authorised = key_checker(api_keys)
    server = Server(models, config, metrics, repository=repository, failed=failed, loader=loader, grpc=grpc, authorised=authorised)

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

    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers=error_handlers(server.metrics))
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)
    app.state.server = server
    return app


def serve(
    runs: str | Path | list[str | Path] | dict[str, str | Path], *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", backend: str = "auto",
    config: ServeConfig | None = None, access_log: bool = False, tta: str | None = None, index: str | Path | None = None, api_keys: list[str] | None = None,
    ssl_keyfile: str | None = None, ssl_certfile: str | None = None, grpc_port: int | None = None,
) -> None:  # fmt: skip
    """Load the model directories ``runs`` (one, a list named by their folders, or {name: run};
    ``config.name`` names a single one) and serve them until interrupted. A model that fails to
    load is reported and the others serve; none loading is an error. ``tta``: test-time
    augmentation, ``imgrec.data.tta``; ``api_keys``: see ``create_app``; ``ssl_keyfile`` and
    ``ssl_certfile``: HTTPS through uvicorn, and TLS on gRPC; ``grpc_port``: the v2 protocol over gRPC there too."""
    import uvicorn

    config = config or ServeConfig()
    named = model_names(runs, config.name)

    def loader(run: Path) -> Classifier:
        return load(run, device=device, backend=backend, tta=tta)

    classifiers, failed = {}, {}
    for name, run in named.items():
        if len(named) == 1:  # one model: its error is the command's
            classifiers[name] = loader(run)
            continue
        try:
            classifiers[name] = loader(run)
        except Exception as exc:  # reported, and the others serve
            failed[name] = f"load failed: {type(exc).__name__}: {exc}"[:500]
            print(f"imgrec serve: {run} ({name!r}) did not load: {exc}", file=sys.stderr, flush=True)
    if not classifiers:
        raise ValueError("no model loaded: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
    for name, classifier in classifiers.items():
        print(f"imgrec serve: {named[name]} as model {name!r}, backend {classifier.backend} ({classifier.backend_reason})", flush=True)
    found = Index(index) if index is not None else None
    tls = (ssl_keyfile, ssl_certfile) if ssl_keyfile else None
    app = create_app(classifiers, config, found, api_keys, grpc={"host": host, "port": grpc_port, "tls": tls} if grpc_port is not None else None,
                     repository=named, failed=failed, loader=loader)  # fmt: skip
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info", timeout_keep_alive=30, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)


def model_names(runs: str | Path | list[str | Path] | dict[str, str | Path], single_name: str | None = None) -> dict[str, Path]:
    """{name: model directory}: a dict as it is; a list's items as NAME=RUN or named by their
    folder; a single run as ``single_name`` where given. Two models of one name are an error."""
    if isinstance(runs, dict):
        return {name: Path(run) for name, run in runs.items()}
    items = [runs] if isinstance(runs, (str, Path)) else list(runs)
    named: dict[str, Path] = {}
    for item in items:
        name, sep, run = str(item).partition("=")
        if not sep or not name or "/" in name:
            name, run = Path(item).resolve().name, str(item)
        if len(items) == 1 and single_name and not sep:
            name = single_name
        if name in named:
            raise ValueError(f"two models named {name!r} ({named[name]} and {run}): name them NAME=RUN")
        named[name] = Path(run)
    return named


__all__ = ["ServeConfig", "Server", "create_app", "serve"]
