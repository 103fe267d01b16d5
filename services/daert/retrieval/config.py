"""Retrieval service settings: `DAERT_RETRIEVAL_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings


class RetrievalSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_RETRIEVAL_")

    port: int = Field(DEFAULT_PORTS["retrieval"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("retrieval"), ge=-1, le=65535)
    backend: Literal["pgvector", "weaviate"] = Field(
        "pgvector", description="Vector store behind the contract."
    )

    # pgvector
    dsn: SecretStr | None = Field(
        None,
        description="pgvector: libpq connection string or URI of a PostgreSQL with the vector "
        "extension available (`make up` starts an embedded one and sets this).",
    )
    pool_min_size: int = Field(1, ge=0, description="pgvector: connections kept open.")
    pool_max_size: int = Field(8, gt=0, description="pgvector: most connections open at once.")
    connect_timeout_s: float = Field(
        3.0,
        gt=0,
        description="How long a call waits for a database connection before UNAVAILABLE.",
    )

    # weaviate
    weaviate_url: str | None = Field(
        None, description="weaviate: REST endpoint, e.g. http://weaviate:8080."
    )
    weaviate_grpc_host: str | None = Field(
        None,
        description="weaviate: gRPC host, when not the URL's (the official chart serves gRPC "
        "on a Service of its own).",
    )
    weaviate_grpc_port: int = Field(50051, gt=0, le=65535, description="weaviate: gRPC port.")
    weaviate_api_key: SecretStr | None = Field(None, description="weaviate: API key, if any.")

    # search and write limits
    default_ef_search: int = Field(
        100, gt=0, description="HNSW candidate list size when a Search does not set ef_search."
    )
    max_ef_search: int = Field(1000, gt=0, description="Largest ef_search a Search may ask for.")
    max_top_k: int = Field(1000, gt=0, description="Largest top_k a Search may ask for.")
    hybrid_candidates: int = Field(
        100,
        gt=0,
        description="HYBRID: how deep each ranking is read before fusion (at least top_k).",
    )
    max_chunks_per_write: int = Field(
        1000, gt=0, description="Most chunks in one Upsert or ReplaceDocument call."
    )
    max_chunk_text_chars: int = Field(
        100_000, gt=0, description="Longest chunk text accepted, in characters."
    )
    max_dimensions: int = Field(
        2000,
        gt=0,
        description="Largest vector length a collection may have (pgvector's HNSW index "
        "takes at most 2000).",
    )
    default_hnsw_m: int = Field(16, ge=2, le=100, description="HNSW links per node.")
    default_hnsw_ef_construction: int = Field(
        64, ge=4, le=1000, description="HNSW candidate list size while building."
    )

    @model_validator(mode="after")
    def _backend_needs(self) -> RetrievalSettings:
        if self.backend == "pgvector" and self.dsn is None:
            raise ValueError("backend pgvector needs DAERT_RETRIEVAL_DSN")
        if self.backend == "weaviate" and not self.weaviate_url:
            raise ValueError("backend weaviate needs DAERT_RETRIEVAL_WEAVIATE_URL")
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("DAERT_RETRIEVAL_POOL_MIN_SIZE is more than POOL_MAX_SIZE")
        return self
