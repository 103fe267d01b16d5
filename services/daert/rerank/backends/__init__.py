"""Rerank backends: one module per real backend, behind `RerankBackend`."""

from __future__ import annotations

from daert.rerank.backends.base import ModelInfo, RerankBackend, Scored
from daert.rerank.config import ModelConfig, RerankSettings


def create_backend(config: ModelConfig, settings: RerankSettings) -> RerankBackend:
    """The backend for one configured model (imports torch only when it is needed)."""
    if config.backend == "tei":
        from daert.rerank.backends.tei import TeiBackend

        return TeiBackend(config)
    if config.backend == "cross-encoder":
        from daert.rerank.backends.cross_encoder import CrossEncoderBackend

        return CrossEncoderBackend(config, settings)
    from daert.rerank.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(config, settings)


__all__ = ["ModelInfo", "RerankBackend", "Scored", "create_backend"]
