"""Prometheus metrics of the server: requests by route and status, latency, batch sizes, errors by kind."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per server (so that several in one process, as in tests, keep separate counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("imgrec_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("imgrec_request_seconds", "time to answer a request", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("imgrec_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("imgrec_batch_seconds", "time of one forward pass", buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("imgrec_images", "images classified", registry=r)
        self.errors = Counter("imgrec_errors", "requests refused or failed, by kind", ["kind"], registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting each HTTP request under its route's template (``/v2/models/{name}/infer``)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # a template, so that odd paths cannot multiply the series
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


__all__ = ["Metrics", "MetricsMiddleware"]
