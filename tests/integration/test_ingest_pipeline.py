"""The ingestion pipeline against the real embedding and retrieval services: a first run
writes the corpus, a second one finds nothing to do, a third one picks up a change and a
deletion; a retrieval service that is not there fails the task at once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from daert.clients import RetrievalClient
from daert.ingest.errors import ServiceUnavailable
from daert.ingest.pipeline import ingest_batch, prepare, summarize
from daert.testing import ServerProcess
from daert.v1 import retrieval_pb2
from google.protobuf import json_format

from tests.helpers import free_port
from tests.ingest_corpus import write_corpus

DOCUMENTS = 8  # in the corpus
READABLE = 6  # all but the malformed PDF (failed) and the binary file (skipped)


def _run(params: dict[str, Any]) -> dict[str, Any]:
    """What the DAG does: prepare, one ingest_batch per batch, summarize."""
    plan = prepare(params)
    reports = [ingest_batch(params, batch) for batch in plan["batches"]]
    return summarize(params, [plan["report"], *reports], plan["removal"], plan["started_at"])


def _stored(target: str, collection: str) -> dict[str, dict[str, Any]]:
    async def listed() -> dict[str, dict[str, Any]]:
        async with RetrievalClient(target) as client:
            reply = await client.stub.ListDocuments(
                retrieval_pb2.ListDocumentsRequest(collection=collection, page_size=1000)
            )
        return {
            d.document_id: {"chunks": d.chunk_count, **json_format.MessageToDict(d.metadata)}
            for d in reply.documents
        }

    return asyncio.run(listed())


def test_runs_are_incremental_and_sync_deletes_what_is_gone(
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DAERT_EMBEDDING_TARGET", embedding_server.target)
    monkeypatch.setenv("DAERT_RETRIEVAL_TARGET", retrieval_server.target)
    corpus = write_corpus(tmp_path / "docs")
    collection = f"ingest_{uuid.uuid4().hex[:8]}"
    params = {
        "source": str(tmp_path / "docs"),
        "collection": collection,
        "mode": "sync",
        "batch_size": 3,
        "metadata": {"team": "docs"},
    }

    first = _run(params)
    assert (first["seen"], first["new"], first["failed"], first["skipped"]) == (8, 6, 1, 1)
    assert first["failures"][0]["uri"] == corpus["malformed_pdf"].as_uri()
    assert "malformed PDF" in first["failures"][0]["reason"]
    assert "binary" in first["skips"][0]["reason"]
    assert first["chunks_written"] == first["chunks_embedded"] > READABLE  # long.txt: several
    stored = _stored(retrieval_server.target, collection)
    assert len(stored) == READABLE
    pdf = next(m for m in stored.values() if m["source_uri"] == corpus["pdf"].as_uri())
    assert (pdf["title"], pdf["page"], pdf["team"], pdf["chunks"]) == (
        "Annual report",
        1,
        "docs",
        2,
    )

    second = _run(params)
    assert (second["unchanged"], second["new"], second["changed"]) == (READABLE, 0, 0)
    assert (second["chunks_embedded"], second["chunks_written"], second["deleted"]) == (0, 0, 0)

    corpus["markdown"].write_text("# Deploying the stack\n\nNow with one paragraph only.\n")
    corpus["text"].unlink()
    third = _run(params)
    assert (third["changed"], third["unchanged"], third["deleted"]) == (1, READABLE - 2, 1)
    assert third["chunks_written"] == third["chunks_embedded"] == 1
    assert third["chunks_deleted"] == 3 + 1  # the guide's other sections, the notes' chunk
    stored = _stored(retrieval_server.target, collection)
    assert corpus["text"].as_uri() not in {m["source_uri"] for m in stored.values()}
    assert "1 deleted" in third["summary"]


def test_a_dead_retrieval_service_fails_fast(
    embedding_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("DAERT_EMBEDDING_TARGET", embedding_server.target)
    monkeypatch.setenv("DAERT_RETRIEVAL_TARGET", dead)
    (tmp_path / "a.md").write_text("# A\n\ntext")
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the refused connection ended the client's retries
    # before its 30 s deadline; a hang would be the deadline's error instead.
    with pytest.raises(
        ServiceUnavailable, match=f"the retrieval service at {dead} answered UNAVAILABLE: "
    ):
        prepare({"source": str(tmp_path), "collection": "never"})


def test_a_document_over_the_size_limit_fails_alone(
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DAERT_EMBEDDING_TARGET", embedding_server.target)
    monkeypatch.setenv("DAERT_RETRIEVAL_TARGET", retrieval_server.target)
    (tmp_path / "small.md").write_text("# Small\n\nA short note.\n")
    (tmp_path / "large.txt").write_text("A long line of text. " * 100)  # 2,100 bytes
    monkeypatch.setenv("DAERT_INGEST_MAX_DOCUMENT_BYTES", "1000")
    summary = _run({"source": str(tmp_path), "collection": f"size_{uuid.uuid4().hex[:8]}"})
    assert (summary["new"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [
        {
            "uri": (tmp_path / "large.txt").as_uri(),
            "reason": "2100 bytes, over DAERT_INGEST_MAX_DOCUMENT_BYTES (1000)",
        }
    ]
