"""The protocol every retrieval backend implements.

The servicer validates requests and fuses hybrid rankings; a backend stores and ranks. Every
method takes the tenant and enforces it: a backend never reads or writes across tenants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from daert.retrieval.filters import Filter
from daert.retrieval.model import (
    ChunkRecord,
    CollectionInfo,
    CollectionSpec,
    DocumentSummary,
    ScoredChunk,
    Vector,
    WriteCounts,
)


class RetrievalBackend(Protocol):
    kind: str  # "pgvector" or "weaviate"
    # Whether ReplaceDocument is one transaction: readers never see old and new chunks mixed.
    atomic_replace: bool

    async def start(self) -> None:
        """Connect and bring the schema up to date. Must not fail when the store is down:
        the service then starts NOT_SERVING and recovers when `ready` succeeds."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...

    async def create_collection(
        self, spec: CollectionSpec, if_not_exists: bool
    ) -> tuple[CollectionInfo, bool]:
        """The stored collection and whether it was created. ALREADY_EXISTS when a
        different one exists, or an equal one and not `if_not_exists`."""
        ...

    async def delete_collection(self, tenant: str, name: str) -> int | None:
        """Chunks deleted with the collection; None when there was no such collection."""
        ...

    async def list_collections(self, tenant: str) -> list[CollectionInfo]: ...

    async def describe(self, tenant: str, name: str, counts: bool = False) -> CollectionInfo:
        """The collection (NOT_FOUND when missing); counts only when asked for, as they cost
        a scan. Callers on hot paths get a cached answer."""
        ...

    async def upsert(self, spec: CollectionSpec, chunks: Sequence[ChunkRecord]) -> WriteCounts:
        """Insert or update by id; a chunk whose content hash is unchanged is not written."""
        ...

    async def replace_document(
        self, spec: CollectionSpec, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> WriteCounts:
        """Upsert `chunks` and delete the document's other chunks, atomically."""
        ...

    async def get(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        include_vectors: bool,
    ) -> list[ChunkRecord]:
        """Chunks for `ids` (request order), then for `document_ids` (grouped), each once."""
        ...

    async def list_documents(
        self,
        spec: CollectionSpec,
        document_ids: Sequence[str],
        where: Filter | None,
        limit: int,
        after: str,
    ) -> list[DocumentSummary]:
        """The first `limit` documents with an id greater than `after`, in code point order
        (the same on every backend, so pages never skip or repeat one). Only non-empty
        document ids, only those in `document_ids` when it is not empty, and only chunks
        matching `where` are counted; a document with none is not listed."""
        ...

    async def delete(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        where: Filter | None,
    ) -> int:
        """Delete by ids, by document ids or by filter (exactly one is given)."""
        ...

    async def vector_search(
        self,
        spec: CollectionSpec,
        vector: Vector,
        top_k: int,
        where: Filter | None,
        ef_search: int,
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        """Approximate nearest neighbours, best first; score is the metric's similarity
        (cosine, inner product, or negated L2 distance)."""
        ...

    async def keyword_search(
        self,
        spec: CollectionSpec,
        text: str,
        top_k: int,
        where: Filter | None,
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        """Full-text matches of `text`, best first."""
        ...
