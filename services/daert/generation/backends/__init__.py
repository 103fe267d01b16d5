"""Inference-server backends, one module per wire format, behind `GenerationBackend`."""

from __future__ import annotations

from daert.generation.backends.base import Completion, GenerationBackend, UpstreamCall
from daert.generation.backends.ollama import OllamaBackend
from daert.generation.backends.openai import OpenAIBackend
from daert.generation.backends.tgi import TgiBackend
from daert.generation.config import BackendKind, ModelConfig


def create_backend(
    config: ModelConfig, kind: BackendKind | None = None, url: str | None = None
) -> GenerationBackend:
    """The backend for a configured model; `kind` and `url` override the model's own for a
    LoRA replica the router chose (same timeouts and chat template)."""
    match kind or config.backend:
        case "tgi":
            return TgiBackend(config, url)
        case "openai":
            return OpenAIBackend(config, url)
        case "ollama":
            return OllamaBackend(config)
    raise ValueError(f"unknown backend {kind!r}")


__all__ = ["Completion", "GenerationBackend", "UpstreamCall", "create_backend"]
