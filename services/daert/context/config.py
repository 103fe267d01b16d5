"""Context service settings: `DAERT_CONTEXT_*` environment variables."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings, unique_names

TokenizerKind = Literal["llama_cpp", "huggingface"]

# The embedded LLM of `daert up` (llama.cpp's llama-server with Gemma 3 270M).
EMBEDDED_LLM_NAME = "gemma-3-270m"
EMBEDDED_LLM_URL = "http://localhost:8090"


class TokenizerConfig(BaseModel):
    """One entry of DAERT_CONTEXT_TOKENIZERS (a JSON list); the first entry is the default.
    Name each after the generation model that reads the conversation, so that
    `CompressRequest.tokenizer` can be the model's name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Name clients pass as `tokenizer`.")
    kind: TokenizerKind = Field(
        description="llama_cpp: ask the llama.cpp server that runs the model (its "
        "/apply-template and /tokenize), so counts are the server's own. huggingface: a "
        "tokenizer folder (tokenizer.json + tokenizer_config.json with its chat_template) "
        "loaded in process."
    )
    url: str | None = Field(None, description="llama_cpp: base URL of the llama.cpp server.")
    path: str | None = Field(None, description="huggingface: local tokenizer folder.")
    timeout_s: float = Field(10.0, gt=0, description="llama_cpp: per-request HTTP timeout.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url.rstrip("/") if url else url

    @model_validator(mode="after")
    def _kind_needs(self) -> TokenizerConfig:
        if self.kind == "llama_cpp" and not self.url:
            raise ValueError(f"tokenizer {self.name!r}: kind llama_cpp needs `url`")
        if self.kind == "huggingface" and not self.path:
            raise ValueError(f"tokenizer {self.name!r}: kind huggingface needs `path`")
        return self


class ContextSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_CONTEXT_")

    port: int = Field(DEFAULT_PORTS["context"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("context"), ge=-1, le=65535)
    tokenizers: list[TokenizerConfig] = Field(
        default_factory=lambda: [
            TokenizerConfig(name=EMBEDDED_LLM_NAME, kind="llama_cpp", url=EMBEDDED_LLM_URL)
        ],
        min_length=1,
        description="JSON list of tokenizers; the first is the default. Default: the embedded "
        "LLM's llama.cpp server at localhost:8090.",
    )
    summary_model: str = Field(
        "",
        description="Generation model that writes abstractive summaries; empty: the "
        "generation service's default (DAERT_GENERATION_TARGET names the service).",
    )
    summary_chunk_tokens: int = Field(
        1024,
        ge=64,
        description="Most tokens of conversation per summarisation call: longer histories "
        "are folded into the summary chunk by chunk. An abstractive summary is at most a "
        "quarter of this, so a call takes at most about 1.5 times this plus 150 tokens of the "
        "summary model's context.",
    )
    summary_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for one summarisation call."
    )
    extractive_model: str = Field(
        "", description="Embedding model that ranks sentences for EXTRACTIVE; empty: default."
    )
    keep_last_messages: int = Field(
        8,
        ge=0,
        description="Recent non-system messages kept verbatim (as far as they fit) when a "
        "request leaves keep_last_messages unset.",
    )
    max_messages: int = Field(10_000, gt=0, description="Most messages in one request.")
    max_request_chars: int = Field(
        2_000_000, gt=0, description="Most characters in the messages of one request."
    )
    redis_url: str | None = Field(
        None,
        description="Redis for rolling summaries (redis://host:6379/0); unset: every call is "
        "stateless.",
    )
    redis_password: str | None = Field(None, description="Redis password.")
    redis_timeout_s: float = Field(
        0.25, gt=0, description="Longest wait for Redis before going on without it."
    )
    summary_ttl_s: int = Field(
        7 * 24 * 3600, gt=0, description="How long a rolling summary is kept after its last use."
    )

    _unique_names = field_validator("tokenizers")(unique_names)
