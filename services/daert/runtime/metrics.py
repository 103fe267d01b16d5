"""Prometheus metrics shared by every server, exposed on the service's metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_REQUESTS = Counter(
    "daert_grpc_requests_total",
    "RPCs handled, by method and final status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "daert_grpc_request_duration_seconds",
    "Time from receiving an RPC to sending its status.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RPC_IN_FLIGHT = Gauge(
    "daert_grpc_requests_in_flight",
    "RPCs currently being handled.",
    ["service", "method"],
)
BACKEND_READY = Gauge(
    "daert_backend_ready",
    "1 when the service's backends answered the last readiness check, else 0.",
    ["service"],
)
BATCH_SIZE = Histogram(
    "daert_batch_size",
    "Items per model batch formed by a micro-batcher.",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_QUEUE_DEPTH = Gauge(
    "daert_batch_queue_depth",
    "Items waiting in a micro-batcher.",
    ["batcher"],
)
