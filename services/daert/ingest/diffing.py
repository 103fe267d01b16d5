"""What a run must do with each document: compare the source with what is stored.

A document is unchanged when its bytes (content hash), the ingest fingerprint (everything
else that shapes its chunks) and the source entry it came from all match what its stored
chunks say; only then is it skipped without being parsed or embedded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from daert.ingest.params import Mode

# Bump when a reader or the chunker would cut the same bytes differently: every document
# is then re-ingested once.
PIPELINE_VERSION = 1


class Status(StrEnum):
    NEW = "new"  # not stored yet
    CHANGED = "changed"  # stored, but from other bytes or other settings
    UNCHANGED = "unchanged"  # stored as it would be written now: skipped
    REINDEXED = "reindexed"  # unchanged, but "full" mode writes it again


@dataclass(frozen=True)
class StoredDocument:
    """What the stored chunks of a document say about it (ListDocuments' metadata)."""

    document_id: str
    content_hash: str
    ingest_fingerprint: str
    ingest_source: str

    @classmethod
    def from_metadata(cls, document_id: str, metadata: Mapping[str, Any]) -> StoredDocument:
        return cls(
            document_id,
            str(metadata.get("content_hash", "")),
            str(metadata.get("ingest_fingerprint", "")),
            str(metadata.get("ingest_source", "")),
        )


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingest_fingerprint(
    *,
    model: str,
    dimensions: int,
    chunk_tokens: int,
    overlap_tokens: int,
    capacity: int,
    metadata: Mapping[str, Any],
) -> str:
    """A hash of the settings that change the chunks: the resolved model name, vector
    dimensions, chunk size (asked for and effective), overlap, the extra metadata and
    PIPELINE_VERSION."""
    settings = {
        "model": model,
        "dimensions": dimensions,
        "chunk_tokens": chunk_tokens,
        "overlap_tokens": overlap_tokens,
        "capacity": capacity,
        "metadata": metadata,
        "version": PIPELINE_VERSION,
    }
    encoded = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def decide(
    stored: StoredDocument | None,
    *,
    content_hash: str,
    fingerprint: str,
    source: str,
    mode: Mode,
) -> Status:
    if stored is None:
        return Status.NEW
    same = (stored.content_hash, stored.ingest_fingerprint, stored.ingest_source) == (
        content_hash,
        fingerprint,
        source,
    )
    if not same:
        return Status.CHANGED
    return Status.REINDEXED if mode == "full" else Status.UNCHANGED


def vanished(stored_ids: Iterable[str], present_ids: Iterable[str]) -> list[str]:
    """Stored documents no longer in the source ("sync" mode deletes them), sorted."""
    return sorted(set(stored_ids).difference(present_ids))
