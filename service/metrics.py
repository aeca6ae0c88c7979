"""Prometheus metrics of one app instance (its own registry, so several apps can coexist)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double the exposition size and are not used by Prometheus queries.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class ServiceMetrics:
    """Request counts and latency by route template and status, queue depth, batch sizes,
    index size, stage timings and rejections."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lookalike_http_requests", "HTTP requests by method, route template and status",
            ["method", "route", "status"], registry=r,
        )
        self.latency = Histogram(
            "lookalike_http_request_duration_seconds", "HTTP request latency by method, route template and status",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("lookalike_queue_depth", "queries waiting for the inference thread", registry=r)
        self.pending = Gauge("lookalike_pending_queries", "queries admitted and not yet answered", registry=r)
        self.batch_size = Histogram(
            "lookalike_batch_size", "queries per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "lookalike_inference_seconds", "forward pass time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.search_seconds = Histogram(
            "lookalike_search_seconds", "index search time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "lookalike_decode_seconds", "decode + preprocess time per upload", buckets=LATENCY_BUCKETS, registry=r
        )
        self.index_size = Gauge("lookalike_index_size", "vectors in the index", registry=r)
        self.ready = Gauge("lookalike_ready", "1 when every collection's model and index are loaded and verified",
                           registry=r)
        self.collection_ready = Gauge(
            "lookalike_collection_ready", "1 when the collection's model and index are loaded and verified",
            ["collection"], registry=r)
        self.collection_index_size = Gauge(
            "lookalike_collection_index_size", "vectors in the collection's index", ["collection"], registry=r)
        self.rejected = Counter(
            "lookalike_rejected", "requests refused before any work, by reason", ["reason"], registry=r
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        s = str(status)
        self.requests.labels(method, route, s).inc()
        self.latency.labels(method, route, s).observe(seconds)

    def bind(self, *, queue_depth: Callable[[], float], pending: Callable[[], float],
             index_size: Callable[[], float], ready: Callable[[], float]) -> None:
        """Read live values at scrape time (the queue, pending and size of the default collection)."""
        self.queue_depth.set_function(queue_depth)
        self.pending.set_function(pending)
        self.index_size.set_function(index_size)
        self.ready.set_function(ready)

    def bind_collection(self, name: str, *, ready: Callable[[], float], index_size: Callable[[], float]) -> None:
        """Read one collection's readiness and index size at scrape time."""
        self.collection_ready.labels(name).set_function(ready)
        self.collection_index_size.labels(name).set_function(index_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
