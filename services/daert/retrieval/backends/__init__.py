"""Retrieval backends, chosen by DAERT_RETRIEVAL_BACKEND; each imported only when chosen."""

from __future__ import annotations

from daert.retrieval.backends.base import RetrievalBackend
from daert.retrieval.config import RetrievalSettings


def create_backend(settings: RetrievalSettings) -> RetrievalBackend:
    if settings.backend == "weaviate":
        from daert.retrieval.backends.weaviate import WeaviateBackend

        return WeaviateBackend(settings)
    from daert.retrieval.backends.pgvector import PgvectorBackend

    return PgvectorBackend(settings)
