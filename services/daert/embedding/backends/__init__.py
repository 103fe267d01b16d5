"""Embedding backends: one module per real inference server, behind `EmbeddingBackend`."""

from __future__ import annotations

from daert.embedding.backends.base import EmbeddingBackend, Encoded, ModelInfo
from daert.embedding.config import ModelConfig


def create_backend(config: ModelConfig) -> EmbeddingBackend:
    """The backend for one configured model (imports torch only when it is needed)."""
    if config.backend == "tei":
        from daert.embedding.backends.tei import TeiBackend

        return TeiBackend(config)
    if config.backend == "ollama":
        from daert.embedding.backends.ollama import OllamaBackend

        return OllamaBackend(config)
    from daert.embedding.backends.sentence_transformers import SentenceTransformersBackend

    return SentenceTransformersBackend(config)


__all__ = ["EmbeddingBackend", "Encoded", "ModelInfo", "create_backend"]
