"""The gateway's Prometheus metrics (the rate limiter adds its fail-open counter)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "daert_gateway_requests_total",
    "HTTP requests answered, by route, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "daert_gateway_request_duration_seconds",
    "From the request's arrival to the end of its response (a whole stream for SSE).",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TOKENS = Counter(
    "daert_gateway_tokens_total",
    "Tokens counted against API keys' limits (prompt plus completion), by tenant.",
    ["tenant"],
)
