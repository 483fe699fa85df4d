"""Prometheus metrics of one service (its own registry, so several apps in one process never mix counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Request counts and latencies, batch sizes, stage forward times, decisions, and readiness."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cascade_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cascade_request_duration_seconds",
            "Time from request to answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cascade_batch_size", "Images per classifier forward", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.stage = Histogram(
            "cascade_stage_duration_seconds",
            "One batched forward of a stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "cascade_predictions", "Images predicted, by decision", ["decision"], registry=self.registry
        )
        self.ready = Gauge("cascade_model_ready", "1 once the model is loaded and warm", registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int, classifier_s: float, segmenter_s: float) -> None:
        self.batch_size.observe(size)
        self.stage.labels("classifier").observe(classifier_s)
        if segmenter_s > 0:
            self.stage.labels("segmenter").observe(segmenter_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
