"""Ingestion settings: `DAERT_INGEST_*` environment variables of the process that runs the
DAG's tasks (the service targets are the clients' own `DAERT_<SERVICE>_TARGET`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from daert.runtime.settings import load_settings


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_INGEST_")

    tokenizers: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object: embedding model name -> its Hugging Face tokenizer (a "
        "folder holding tokenizer.json, or the file itself), to count chunk tokens with. "
        "The default model all-MiniLM-L6-v2 needs no entry.",
    )
    fetch_timeout_s: float = Field(30.0, gt=0, description="Per-request timeout for http(s).")
    fetch_concurrency: int = Field(8, gt=0, description="Documents fetched at the same time.")
    max_document_bytes: int = Field(
        50_000_000,
        gt=0,
        description="A larger document fails with a reason instead of being read into memory.",
    )
    write_concurrency: int = Field(
        4, gt=0, description="ReplaceDocument calls in flight at the same time."
    )


def ingest_settings() -> IngestSettings:
    """From the environment; ConfigError naming the variable when one is invalid."""
    return load_settings(IngestSettings)
