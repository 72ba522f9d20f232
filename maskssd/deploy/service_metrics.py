"""The detection service's Prometheus metrics (its own registry: several apps may live in one process) and the
ASGI middleware that counts and times every request, refused ones included."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ENDPOINTS", "Metrics", "MetricsMiddleware"]

#: Endpoints counted by name; any other path counts as ``other`` (bounded label values).
ENDPOINTS = ("/detect", "/health", "/metrics", "/montage", "/livez")


class Metrics:
    """The service's Prometheus metrics, in their own registry (several apps may live in one process)."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # the [serve] extra

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "maskssd_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "maskssd_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "maskssd_batch_size",
            "images per model call",
            buckets=tuple(float(b) for b in range(1, max(max_batch, 1) + 1)),
            registry=r,
        )
        self.inference = Histogram(
            "maskssd_model_inference_seconds",
            "network forward time per model call",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "maskssd_batch_seconds",
            "preprocess + forward + NMS time per model call",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.in_flight = Gauge(
            "maskssd_images_in_flight", "decoded images queued or in the model", registry=r
        )
        self.frames = Counter("maskssd_camera_frames", "frames answered per camera", ["camera"], registry=r)
        self.rejected = Counter(
            "maskssd_rejected_images", "refused requests by status code", ["status"], registry=r
        )


class MetricsMiddleware:
    """Counts every request by endpoint and status code and times it (pure ASGI: no body buffering)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope.get("path", "")
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        status = [500]
        t0 = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
