"""Gateway settings: `DAERT_GATEWAY_*` environment variables. The services it calls are found
the way every client finds them (`DAERT_<SERVICE>_TARGET`, else localhost and the default port)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from daert.runtime.settings import ServerSettings

# What the gateway can call, and what /readyz requires by default: chat and embeddings.
GatewayService = Literal["generation", "embedding", "retrieval", "rerank", "context", "lora"]
DEFAULT_PORT = 8000


class GatewaySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_GATEWAY_")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    metrics_port: int = Field(
        9000,
        ge=-1,
        le=65535,
        description="A second Prometheus /metrics port (0 picks one, -1 none); /metrics is "
        "always served on the HTTP port too.",
    )
    dsn: str = Field(
        "", description="PostgreSQL DSN of the API-key store (required: every request needs a key)."
    )
    redis_url: str = Field(
        "", description="Redis shared by the replicas for rate limits; empty: none enforced."
    )
    key_cache_s: float = Field(
        5.0, ge=0, description="How long an authenticated key is trusted before it is re-read."
    )
    key_stale_grace_s: float = Field(
        300.0,
        ge=0,
        description="While PostgreSQL is unreachable, keys seen active this long past their "
        "cache time are still accepted (0: none).",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of each call to a service (a long generation too)."
    )
    catalog_ttl_s: float = Field(
        5.0, ge=0, description="How long the model list from the services is reused."
    )
    required_services: list[GatewayService] = Field(
        ["generation", "embedding"],
        description="Services /readyz requires SERVING (JSON list); the others are reported.",
    )
    rag_context_service: bool = Field(
        True, description="Fit RAG prompts with the context service (else a character estimate)."
    )
