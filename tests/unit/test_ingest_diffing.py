"""Diffing: new, changed, unchanged and vanished documents; fingerprints; "full" mode."""

from __future__ import annotations

from typing import Any

from daert.ingest.diffing import (
    Status,
    StoredDocument,
    content_hash,
    decide,
    ingest_fingerprint,
    vanished,
)
from daert.ingest.params import Mode

SETTINGS: dict[str, Any] = {
    "model": "all-MiniLM-L6-v2",
    "dimensions": 0,
    "chunk_tokens": 200,
    "overlap_tokens": 32,
    "capacity": 200,
    "metadata": {"team": "docs"},
}
FINGERPRINT = ingest_fingerprint(**SETTINGS)
HASH = content_hash(b"hello")
STORED = StoredDocument("doc-1", HASH, FINGERPRINT, "file:///data")


def _decide(
    stored: StoredDocument | None,
    *,
    digest: str = HASH,
    fingerprint: str = FINGERPRINT,
    source: str = "file:///data",
    mode: Mode = "incremental",
) -> Status:
    return decide(stored, content_hash=digest, fingerprint=fingerprint, source=source, mode=mode)


def test_new_changed_unchanged() -> None:
    assert _decide(None) == Status.NEW
    assert _decide(STORED) == Status.UNCHANGED
    assert _decide(STORED, digest=content_hash(b"hello!")) == Status.CHANGED
    assert _decide(STORED, source="file:///other") == Status.CHANGED


def test_every_setting_that_shapes_chunks_changes_the_fingerprint() -> None:
    changes: dict[str, Any] = {
        "model": "other",
        "dimensions": 128,
        "chunk_tokens": 100,
        "overlap_tokens": 0,
        "capacity": 150,
        "metadata": {"team": "ops"},
    }
    for key, value in changes.items():
        fingerprint = ingest_fingerprint(**{**SETTINGS, key: value})
        assert fingerprint != FINGERPRINT, key
        assert _decide(STORED, fingerprint=fingerprint) == Status.CHANGED
    # Key order in the metadata is not a change.
    same = ingest_fingerprint(**{**SETTINGS, "metadata": {"team": "docs"}})
    assert same == FINGERPRINT


def test_full_mode_reingests_everything() -> None:
    assert _decide(STORED, mode="full") == Status.REINDEXED
    assert _decide(None, mode="full") == Status.NEW
    assert _decide(STORED, mode="full", digest="x") == Status.CHANGED
    assert _decide(STORED, mode="sync") == Status.UNCHANGED


def test_stored_document_from_list_documents_metadata() -> None:
    metadata = {
        "content_hash": HASH,
        "ingest_fingerprint": FINGERPRINT,
        "ingest_source": "file:///data",
        "title": "x",
    }
    assert StoredDocument.from_metadata("doc-1", metadata) == STORED
    # Chunks written by something else than ingestion never look unchanged.
    assert _decide(StoredDocument.from_metadata("doc-1", {})) == Status.CHANGED


def test_vanished_documents() -> None:
    assert vanished(["d3", "d1", "d2"], ["d2", "d9"]) == ["d1", "d3"]
    assert vanished(["d1"], ["d1"]) == []
