"""The services `daert serve` and `daert up` know, imported lazily so that serving one
service never imports another's dependencies (torch, database drivers, ...)."""

from __future__ import annotations

import importlib
from typing import Any

from daert.runtime.service import ServiceSpec

# The stack's well-known gRPC ports; each service's metrics port is 9000 + the last two
# digits (embedding: 50052 -> 9052).
DEFAULT_PORTS: dict[str, int] = {
    "generation": 50051,
    "embedding": 50052,
    "retrieval": 50053,
    "rerank": 50054,
    "sandbox": 50055,
    "context": 50056,
    "lora": 50057,
}


def default_metrics_port(service: str) -> int:
    return 9000 + DEFAULT_PORTS[service] % 100


# name -> module exposing SPEC. Later services add a line here as they land.
SERVICES: dict[str, str] = {
    "generation": "daert.generation.app",
    "embedding": "daert.embedding.app",
    "rerank": "daert.rerank.app",
    "retrieval": "daert.retrieval.app",
    "sandbox": "daert.sandbox.app",
    "lora": "daert.lora.app",
    "context": "daert.context.app",
}


def load_spec(name: str) -> ServiceSpec[Any]:
    try:
        module_name = SERVICES[name]
    except KeyError:
        known = ", ".join(sorted(SERVICES))
        raise ValueError(f"unknown service {name!r}; known services: {known}") from None
    spec: ServiceSpec[Any] = importlib.import_module(module_name).SPEC
    return spec
