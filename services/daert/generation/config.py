"""Generation service settings: `DAERT_GENERATION_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings, unique_names

BackendKind = Literal["tgi", "ollama", "openai"]
AdapterMode = Literal["none", "direct", "router"]

DEFAULT_OLLAMA_URL = "http://localhost:11434"


class ModelConfig(BaseModel):
    """One entry of DAERT_GENERATION_MODELS (a JSON list); the first entry is the default."""

    name: str = Field(min_length=1, description="Name clients pass as GenerateRequest.model.")
    backend: BackendKind = Field(
        "ollama",
        description="tgi: Text Generation Inference's native API (also LoRAX). ollama: "
        "Ollama's /api/chat. openai: any OpenAI-compatible server (vLLM, LoRAX, llama.cpp, "
        "TGI's messages API, OpenAI).",
    )
    url: str = Field(
        DEFAULT_OLLAMA_URL,
        min_length=1,
        description="Base URL of the server (for openai, without /v1: http://vllm:8000).",
    )
    upstream_model: str | None = Field(
        None,
        description="The model name the server knows (ollama tag, OpenAI `model`); defaults "
        "to `name`. TGI serves one model and ignores it.",
    )
    chat_template: str | None = Field(
        None,
        description="tgi: Jinja chat template (as in a Hugging Face tokenizer_config.json) "
        "that formats messages into the prompt; without one the model takes raw prompts only.",
    )
    description: str = Field("", description="Shown by ListModels.")
    context_length: int = Field(0, ge=0, description="Context window in tokens; 0 = unknown.")
    supports_structured_output: bool = Field(
        True,
        description="Whether the server can constrain output to a JSON schema or regex; "
        "false answers FAILED_PRECONDITION to such requests.",
    )
    supports_tools: bool = Field(
        True,
        description="Whether the model can call tools (function calling): OpenAI-compatible "
        "servers, Ollama's /api/chat and TGI's messages API all take them, but a model "
        "whose chat template has no tools (or vLLM without --enable-auto-tool-choice) does "
        "not; false answers FAILED_PRECONDITION to requests with tools.",
    )
    supports_logprobs: bool = Field(
        True,
        description="Whether the server returns token log probabilities: vLLM, llama.cpp, "
        "TGI and OpenAI do (vLLM up to its --max-logprobs alternatives), Ollama's API as "
        "the generation service speaks it does not, whatever this says; false answers "
        "FAILED_PRECONDITION naming logprobs.",
    )
    adapters: AdapterMode = Field(
        "none",
        description="LoRA adapters: none (adapter_id rejected), direct (adapter_id sent as-is "
        "to this server), router (the LoRA router picks adapter and replica; needs "
        "DAERT_LORA_TARGET or the default localhost:50057).",
    )
    base_model: str | None = Field(
        None,
        description="router: the base model name the LoRA router knows; defaults to "
        "`upstream_model`, then `name`.",
    )
    api_key_env: str = Field(
        "DAERT_GENERATION_API_KEY",
        description="openai: environment variable holding the bearer token, e.g. from a "
        "Secret (the variable unset: no token).",
    )
    keep_alive: str | None = Field(
        None, description='ollama: how long Ollama keeps the model loaded (e.g. "10m").'
    )
    timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for the next bytes from the server."
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, description="Longest wait to connect: a dead server fails this fast."
    )

    @model_validator(mode="after")
    def _adapters_need_a_lora_server(self) -> ModelConfig:
        if self.backend == "ollama" and self.adapters != "none":
            raise ValueError(f"model {self.name!r}: Ollama serves no LoRA adapters per request")
        return self

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.name

    @property
    def router_base_model(self) -> str:
        return self.base_model or self.upstream_name


class GenerationSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_GENERATION_")

    port: int = Field(DEFAULT_PORTS["generation"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("generation"), ge=-1, le=65535)
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name="llama3.2")],
        min_length=1,
        description="JSON list of models; the first is the default. Default: llama3.2 on "
        "Ollama at localhost:11434.",
    )
    max_request_chars: int = Field(
        1_000_000, gt=0, description="Most characters in the messages or prompt of one call."
    )
    retry_attempts: int = Field(
        3,
        ge=1,
        description="Attempts per request when the server refuses the connection or answers "
        "429/503; only before the first token, never after.",
    )
    retry_backoff_s: float = Field(
        0.2, ge=0, description="First retry delay; doubles each attempt, with jitter."
    )
    redis_url: str | None = Field(
        None, description="Redis for the response cache (redis://host:6379/0); unset: no cache."
    )
    redis_password: str | None = Field(None, description="Redis password.")
    redis_timeout_s: float = Field(
        0.25, gt=0, description="Longest wait for Redis before going on without the cache."
    )
    cache_ttl_s: int = Field(3600, gt=0, description="How long a cached answer is kept.")
    semantic_cache: bool = Field(
        False,
        description="Also answer from the cache when an earlier request's last user message "
        "is similar enough (embedding cosine >= semantic_cache_threshold), scoped by model, "
        "adapter, tenant and every other request field. Uses the embedding service "
        "(DAERT_EMBEDDING_TARGET).",
    )
    semantic_cache_threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity a semantic cache hit needs."
    )
    semantic_cache_model: str = Field(
        "", description="Embedding model for the semantic cache; empty: the service's default."
    )
    semantic_cache_max_entries: int = Field(
        1000, gt=0, description="Entries kept per semantic-cache scope (oldest dropped first)."
    )

    _unique_names = field_validator("models")(unique_names)
