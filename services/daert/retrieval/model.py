"""What the servicer and every backend exchange: plain records, free of protobuf."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


class Metric(StrEnum):
    COSINE = "cosine"
    DOT = "dot"
    L2 = "l2"


@dataclass(frozen=True)
class CollectionSpec:
    """What CreateCollection asks for, defaults resolved."""

    tenant: str
    name: str
    dimensions: int
    metric: Metric
    hnsw_m: int
    hnsw_ef_construction: int
    text_search_language: str


@dataclass(frozen=True)
class CollectionInfo:
    spec: CollectionSpec
    created_at: datetime
    chunk_count: int = 0
    document_count: int = 0


@dataclass
class ChunkRecord:
    id: str
    document_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: Vector | None = None  # always set on write; on read only when asked for

    def content_hash(self) -> bytes:
        """Identity of everything stored for the chunk: an upsert whose hash matches the
        stored one is a no-op. Metadata is hashed in canonical JSON so key order is moot."""
        digest = hashlib.sha256()
        for part in (self.document_id, self.text, canonical_json(self.metadata)):
            encoded = part.encode()
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        assert self.vector is not None
        digest.update(np.ascontiguousarray(self.vector, dtype="<f4").tobytes())
        return digest.digest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class WriteCounts:
    upserted: int = 0
    unchanged: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class ScoredChunk:
    """One entry of a single ranking (vector or keyword), best first."""

    chunk: ChunkRecord
    score: float


@dataclass(frozen=True)
class DocumentSummary:
    """One document as ListDocuments reports it, over the chunks a request counts."""

    document_id: str
    chunk_count: int
    metadata: dict[str, Any]  # of the counted chunk with the smallest id
