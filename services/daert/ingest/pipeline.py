"""The functions the ingestion DAG's tasks call: prepare (which also deletes, in "sync" mode,
the documents gone from the source) -> ingest_batch (one task per batch) -> summarize.

Each is synchronous (it runs its async work with asyncio.run), takes the run's params (a
dict or IngestParams) and returns a JSON-serialisable dict for XCom. They talk to the stack
only through the typed clients: the embedding service (DAERT_EMBEDDING_TARGET) and the
retrieval service (DAERT_RETRIEVAL_TARGET). A problem with one document goes into the
report; a service that is down or overloaded raises ServiceUnavailable, so that Airflow
retries the task; writes are per document and idempotent, so a retried batch converges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import httpx
from google.protobuf import json_format, struct_pb2

from daert.clients import EmbeddingClient, RetrievalClient, ServiceClient, field_violations
from daert.clients.embedding import EMBED_BATCH
from daert.ingest.batching import batches
from daert.ingest.chunking import Chunk, Chunker, load_tokenizer, tokenizer_file
from daert.ingest.diffing import (
    Status,
    StoredDocument,
    content_hash,
    decide,
    ingest_fingerprint,
    vanished,
)
from daert.ingest.errors import (
    DocumentFailed,
    DocumentProblem,
    DocumentSkipped,
    IngestError,
    service_error,
)
from daert.ingest.params import IngestParams, invalid_params, parse_params
from daert.ingest.readers import ParsedDocument, read
from daert.ingest.settings import IngestSettings, ingest_settings
from daert.ingest.sources import (
    Fetched,
    SourceDocument,
    canonical_entries,
    documents_from_dicts,
    fetch,
    list_source,
)
from daert.v1 import common_pb2, embedding_pb2, retrieval_pb2

log = logging.getLogger("daert.ingest")

T = TypeVar("T")
Params = IngestParams | Mapping[str, Any]

# CPU embedding of a full call of long chunks can take a while on a busy machine.
EMBED_TIMEOUT_S = 120.0
# Documents per Delete call, well under the retrieval service's per-call limit.
DELETE_BATCH = 500
# ListDocuments page size (the service's maximum).
LIST_PAGE = 1000


async def _call(client: ServiceClient, doing: str, call: Awaitable[T]) -> T:
    """`call`, with a failed RPC turned into ServiceUnavailable / IngestError naming the
    service, its target and what it was called for."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise service_error(exc, client.service, client.target, doing) from exc


async def _model(embedding: EmbeddingClient, wanted: str) -> embedding_pb2.EmbeddingModel:
    reply: embedding_pb2.EmbeddingServiceListModelsResponse = await _call(
        embedding,
        "listing the embedding models",
        embedding.stub.ListModels(embedding_pb2.EmbeddingServiceListModelsRequest()),
    )
    for model in reply.models:
        if model.name == wanted if wanted else model.is_default:
            return model
    served = ", ".join(m.name for m in reply.models) or "none"
    raise invalid_params(
        f"embedding_model: {wanted!r} is not served by the embedding service at "
        f"{embedding.target} (it serves: {served})"
    )


async def _stored_documents(
    retrieval: RetrievalClient,
    params: IngestParams,
    *,
    document_ids: Sequence[str] = (),
    where: Mapping[str, Any] | None = None,
) -> AsyncIterator[retrieval_pb2.DocumentSummary]:
    """ListDocuments, every page."""
    request = retrieval_pb2.ListDocumentsRequest(
        collection=params.collection,
        tenant=params.tenant,
        document_ids=document_ids,
        page_size=LIST_PAGE,
    )
    if where:
        request.filter.update(where)
    while True:
        reply = await _call(
            retrieval,
            f"listing the documents of collection {params.collection!r}",
            retrieval.stub.ListDocuments(request),
        )
        for document in reply.documents:
            yield document
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- prepare --------------------------------------------------------------------------


async def _ensure_collection(
    params: IngestParams, model: embedding_pb2.EmbeddingModel, retrieval: RetrievalClient
) -> dict[str, Any]:
    if params.dimensions > model.dimensions:
        raise invalid_params(
            f"dimensions: {params.dimensions} is more than the {model.dimensions} of "
            f"model {model.name!r}"
        )
    dimensions = params.dimensions or model.dimensions
    reply = await _call(
        retrieval,
        f"creating collection {params.collection!r}",
        retrieval.stub.CreateCollection(
            retrieval_pb2.CreateCollectionRequest(
                collection=params.collection,
                tenant=params.tenant,
                dimensions=dimensions,
                if_not_exists=True,
            )
        ),
    )
    return {"model": model.name, "dimensions": dimensions, "collection_created": reply.created}


# Documents fetched and hashed at a time while prepare() sorts out what has changed, so that
# a large source is never held in memory at once.
TRIAGE_GROUP = 64


async def _prepare(
    params: IngestParams, documents: list[SourceDocument], report: BatchReport
) -> tuple[dict[str, Any], list[SourceDocument], dict[str, Any]]:
    """The collection made sure of, the documents with work to do (new, changed, or every
    one in "full" mode), and what "sync" mode deleted; `report` counts the others."""
    settings = ingest_settings()
    async with EmbeddingClient() as embedding, RetrievalClient() as retrieval:
        model = await _model(embedding, params.embedding_model)
        collection = await _ensure_collection(params, model, retrieval)
        run = _BatchRun(params, embedding, retrieval, model, settings, report)
        work: list[SourceDocument] = []
        for start in range(0, len(documents), TRIAGE_GROUP):
            group = documents[start : start + TRIAGE_GROUP]
            work += [w.document for w in await run.triage(group, settings)]
        removal = NOTHING_REMOVED
        if params.mode == "sync":
            present = {d.document_id for d in documents}
            removal = await _remove_vanished(params, present, retrieval)
    return collection, work, removal


def prepare(params: Params) -> dict[str, Any]:
    """Validate the params, make sure the collection exists, list the source, and fetch and
    hash every document to find those with work to do: only they are batched, so a run over
    an unchanged source maps no batch at all.

    Returns ``{"batches": [{"label", "documents": [{uri, document_id, name, source}]}],
    "report": a BatchReport of the documents not batched (unchanged, or failed to fetch),
    "removal": what "sync" mode deleted (see _remove_vanished), "document_ids": [every
    listed id], "documents": n, "collection", "tenant", "model",
    "dimensions", "collection_created", "started_at"}``. Raises InvalidParams, EmptySource
    (a source entry matches nothing), ServiceUnavailable or IngestError.
    """
    started_at = _now()
    checked = parse_params(params)
    documents = list_source(checked.sources)
    report = BatchReport(label="prepare")
    collection, work, removal = asyncio.run(_prepare(checked, documents, report))
    report.seen = len(documents) - len(work)
    planned = batches(work, checked.batch_size)
    log.info(
        "%d documents: %d to write in %d batches, %d unchanged, %d failed, %d skipped; "
        "collection %r (model %s, %d dimensions%s)",
        len(documents),
        len(work),
        len(planned),
        report.unchanged,
        report.failed,
        report.skipped,
        checked.collection,
        collection["model"],
        collection["dimensions"],
        ", created" if collection["collection_created"] else "",
    )
    return {
        "batches": [batch.to_dict() for batch in planned],
        "report": asdict(report),
        "removal": removal,
        "document_ids": [d.document_id for d in documents],
        "documents": len(documents),
        "collection": checked.collection,
        "tenant": checked.tenant,
        **collection,
        "started_at": started_at,
    }


# --- ingest_batch ---------------------------------------------------------------------


@dataclass
class BatchReport:
    label: str
    seen: int = 0
    new: int = 0
    changed: int = 0
    reindexed: int = 0  # unchanged, written again because mode is "full"
    unchanged: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)  # [{uri, reason}]
    skips: list[dict[str, str]] = field(default_factory=list)  # [{uri, reason}]
    chunks_embedded: int = 0
    chunks_written: int = 0  # inserted or changed by ReplaceDocument
    chunks_deleted: int = 0  # old chunks a shorter new version no longer has
    seconds: float = 0.0

    def problem(self, document: SourceDocument, problem: DocumentProblem) -> None:
        entry = {"uri": document.uri, "reason": problem.reason}
        if isinstance(problem, DocumentSkipped):
            self.skipped += 1
            self.skips.append(entry)
            log.info("%s: skipped: %s", document.name, problem.reason)
        else:
            self.failed += 1
            self.failures.append(entry)
            log.warning("%s: failed: %s", document.name, problem.reason)


@dataclass(frozen=True)
class _Work:
    """A document that differs from what the collection holds (or "full" mode)."""

    document: SourceDocument
    fetched: Fetched
    digest: str
    status: Status


@dataclass(frozen=True)
class _Prepared:
    """A document that is to be written: its chunks and their metadata."""

    document: SourceDocument
    status: Status
    chunks: list[Chunk]
    metadata: list[dict[str, Any]]


class _BatchRun:
    """One batch (or prepare()'s look at the whole source): the clients, the model and the
    chunker it needs, and its report."""

    def __init__(
        self,
        params: IngestParams,
        embedding: EmbeddingClient,
        retrieval: RetrievalClient,
        model: embedding_pb2.EmbeddingModel,
        settings: IngestSettings,
        report: BatchReport,
    ) -> None:
        self.params = params
        self.embedding = embedding
        self.retrieval = retrieval
        self.model = model.name
        self.chunker = _chunker(model, params, settings)
        self.report = report
        self.ingested_at = _now()
        self.fingerprint = ingest_fingerprint(
            model=model.name,
            dimensions=params.dimensions,
            chunk_tokens=params.chunk_tokens,
            overlap_tokens=params.chunk_overlap_tokens,
            capacity=self.chunker.capacity,
            metadata=params.metadata,
        )

    def metadata(
        self, document: SourceDocument, digest: str, parsed: ParsedDocument, chunk: Chunk
    ) -> dict[str, Any]:
        ours: dict[str, Any] = {
            "source_uri": document.uri,
            "title": parsed.title,
            "headings": list(chunk.headings),
            "content_hash": digest,
            "ingest_fingerprint": self.fingerprint,
            "ingest_source": document.source,
            "ingested_at": self.ingested_at,
            "position": chunk.position,
        }
        if chunk.page is not None:
            ours["page"] = chunk.page
        # params reject user keys that collide with ours; ours last all the same.
        return {**self.params.metadata, **ours}

    async def triage(
        self, documents: Sequence[SourceDocument], settings: IngestSettings
    ) -> list[_Work]:
        """Fetch and hash the documents and compare each with what the collection holds:
        the report counts the unchanged ones (skipped before any parsing or embedding) and
        those that could not be fetched; the others are returned."""
        fetched = await _fetch_all(documents, settings)
        stored: dict[str, StoredDocument] = {}
        ids = [d.document_id for d in documents]
        for start in range(0, len(ids), LIST_PAGE):  # the service takes so many ids a call
            async for summary in _stored_documents(
                self.retrieval, self.params, document_ids=ids[start : start + LIST_PAGE]
            ):
                stored[summary.document_id] = StoredDocument.from_metadata(
                    summary.document_id, json_format.MessageToDict(summary.metadata)
                )
        work: list[_Work] = []
        for document, got in zip(documents, fetched, strict=True):
            if isinstance(got, DocumentProblem):
                self.report.problem(document, got)
                continue
            digest = content_hash(got.data)
            status = decide(
                stored.get(document.document_id),
                content_hash=digest,
                fingerprint=self.fingerprint,
                source=document.source,
                mode=self.params.mode,
            )
            if status == Status.UNCHANGED:
                self.report.unchanged += 1
            else:
                work.append(_Work(document, got, digest, status))
        return work

    def prepare(self, work: _Work) -> _Prepared:
        document = work.document
        parsed = read(work.fetched.data, document.name, work.fetched.content_type)
        chunks = self.chunker.chunks(document.document_id, parsed)
        if not chunks:
            raise DocumentSkipped("no text in the document")
        metadata = [self.metadata(document, work.digest, parsed, chunk) for chunk in chunks]
        return _Prepared(document, work.status, chunks, metadata)

    async def embed(self, prepared: _Prepared) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(prepared.chunks), EMBED_BATCH):
            request = embedding_pb2.EmbedRequest(
                inputs=[c.text for c in prepared.chunks[start : start + EMBED_BATCH]],
                model=self.model,
                input_type=embedding_pb2.INPUT_TYPE_DOCUMENT,
                dimensions=self.params.dimensions,
                # An over-long chunk is an error to report, never a silently cut vector.
                truncation=embedding_pb2.TRUNCATION_NONE,
            )
            try:
                reply = await self.embedding.stub.Embed(request, timeout=EMBED_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    doing = f"embedding {prepared.document.uri}"
                    raise service_error(exc, "embedding", self.embedding.target, doing) from exc
                violations = field_violations(exc) or {"": exc.details() or ""}
                raise DocumentFailed(
                    "the embedding service refused a chunk: "
                    + "; ".join(_chunk_field(f, start) + d for f, d in violations.items())
                ) from exc
            vectors += [list(v.values) for v in reply.embeddings]
        return vectors

    async def write(self, prepared: _Prepared, vectors: list[list[float]]) -> None:
        document = prepared.document
        chunks = [
            retrieval_pb2.Chunk(
                id=chunk.id,
                document_id=document.document_id,
                text=chunk.text,
                vector=common_pb2.Vector(values=vector),
                metadata=_struct(metadata),
            )
            for chunk, vector, metadata in zip(
                prepared.chunks, vectors, prepared.metadata, strict=True
            )
        ]
        request = retrieval_pb2.ReplaceDocumentRequest(
            collection=self.params.collection,
            tenant=self.params.tenant,
            document_id=document.document_id,
            chunks=chunks,
        )
        try:
            reply = await self.retrieval.stub.ReplaceDocument(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise DocumentFailed(f"the retrieval service refused it: {exc.details()}") from exc
            doing = f"writing {document.uri}"
            raise service_error(exc, "retrieval", self.retrieval.target, doing) from exc
        self.report.chunks_written += reply.upserted
        self.report.chunks_deleted += reply.deleted

    async def ingest(self, prepared: _Prepared, limit: asyncio.Semaphore) -> None:
        """Embed and write one document; a per-document problem lands in the report."""
        async with limit:
            try:
                vectors = await self.embed(prepared)
                self.report.chunks_embedded += len(vectors)
                await self.write(prepared, vectors)
            except DocumentProblem as problem:
                self.report.problem(prepared.document, problem)
                return
        status = prepared.status.value  # "new", "changed" or "reindexed": a report count
        setattr(self.report, status, getattr(self.report, status) + 1)
        log.info("%s: %s, %d chunks", prepared.document.name, status, len(prepared.chunks))


def _chunker(
    model: embedding_pb2.EmbeddingModel, params: IngestParams, settings: IngestSettings
) -> Chunker:
    """The chunker for the model, counting with its tokenizer and within its input limit."""
    return Chunker(
        load_tokenizer(tokenizer_file(model.name, settings.tokenizers)),
        model.max_input_tokens,
        params.chunk_tokens,
        params.chunk_overlap_tokens,
    )


def _chunk_field(field_name: str, offset: int) -> str:
    """Field "inputs[3]" of one Embed call, as the chunk it is within the document."""
    if field_name.startswith("inputs[") and field_name.endswith("]"):
        return f"chunk {offset + int(field_name[7:-1])}: "
    return f"{field_name}: " if field_name else ""


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def _fetch_all(
    documents: Sequence[SourceDocument], settings: IngestSettings
) -> list[Fetched | DocumentProblem]:
    limit = asyncio.Semaphore(settings.fetch_concurrency)

    async def one(document: SourceDocument, http: httpx.AsyncClient) -> Fetched | DocumentProblem:
        async with limit:
            try:
                fetched = await fetch(document, http)
            except DocumentProblem as problem:
                return problem
        size, most = len(fetched.data), settings.max_document_bytes
        if size > most:
            return DocumentFailed(f"{size} bytes, over DAERT_INGEST_MAX_DOCUMENT_BYTES ({most})")
        return fetched

    async with httpx.AsyncClient(timeout=settings.fetch_timeout_s, follow_redirects=True) as http:
        return await asyncio.gather(*(one(d, http) for d in documents))


async def _ingest_batch(
    params: IngestParams, documents: list[SourceDocument], report: BatchReport
) -> None:
    settings = ingest_settings()
    async with (
        EmbeddingClient(timeout_s=EMBED_TIMEOUT_S) as embedding,
        RetrievalClient() as retrieval,
    ):
        model = await _model(embedding, params.embedding_model)
        run = _BatchRun(params, embedding, retrieval, model, settings, report)
        # Checked again: the document may have changed (or been written) since prepare().
        todo: list[_Prepared] = []
        for work in await run.triage(documents, settings):
            try:
                todo.append(run.prepare(work))
            except DocumentProblem as problem:
                report.problem(work.document, problem)
        limit = asyncio.Semaphore(settings.write_concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                for prepared in todo:
                    group.create_task(run.ingest(prepared, limit))
        except* IngestError as errors:  # the first one says it; the rest were cancelled
            raise errors.exceptions[0] from None


def ingest_batch(params: Params, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Ingest one batch of prepare()'s "batches": fetch, skip unchanged documents, parse,
    chunk, embed and write each changed or new one (ReplaceDocument: all or nothing).

    Returns the BatchReport as a dict: ``{"label", "seen", "new", "changed", "reindexed",
    "unchanged", "failed", "skipped", "failures": [{uri, reason}], "skips": [{uri,
    reason}], "chunks_embedded", "chunks_written", "chunks_deleted", "seconds"}``, where
    seen = new + changed + reindexed + unchanged + failed + skipped. Raises
    ServiceUnavailable (retry) or IngestError.
    """
    started = time.monotonic()
    checked = parse_params(params)
    documents = documents_from_dicts(batch["documents"])
    report = BatchReport(label=str(batch.get("label", "")), seen=len(documents))
    log.info("batch %s: %d documents", report.label, len(documents))
    asyncio.run(_ingest_batch(checked, documents, report))
    report.seconds = round(time.monotonic() - started, 3)
    log.info(
        "batch %s: %d new, %d changed, %d reindexed, %d unchanged, %d failed, %d skipped; "
        "%d chunks written in %.1f s",
        report.label,
        report.new,
        report.changed,
        report.reindexed,
        report.unchanged,
        report.failed,
        report.skipped,
        report.chunks_written,
        report.seconds,
    )
    return asdict(report)


# --- "sync" mode: documents gone from the source -------------------------------------

NOTHING_REMOVED: dict[str, Any] = {"documents_deleted": 0, "chunks_deleted": 0, "deleted": []}


async def _remove_vanished(
    params: IngestParams, present: set[str], retrieval: RetrievalClient
) -> dict[str, Any]:
    """Delete the stored documents listed under one of this source's entries (their
    `ingest_source`) that are not `present`: a file removed from a folder, one that no longer
    matches a glob. Documents of an entry dropped from the source (or of a URL dropped from a
    list), and of other sources writing to the same collection, are left alone. `present` is
    never empty (an empty source is EmptySource), so this never deletes everything.
    Returns ``{"documents_deleted", "chunks_deleted", "deleted": [{document_id, uri}]}``."""
    where = {"ingest_source": {"in": canonical_entries(params.sources)}}
    uris = {
        s.document_id: str(json_format.MessageToDict(s.metadata).get("source_uri", ""))
        async for s in _stored_documents(retrieval, params, where=where)
    }
    gone = vanished(uris, present)
    chunks = 0
    for start in range(0, len(gone), DELETE_BATCH):
        reply = await _call(
            retrieval,
            f"deleting vanished documents from collection {params.collection!r}",
            retrieval.stub.Delete(
                retrieval_pb2.DeleteRequest(
                    collection=params.collection,
                    tenant=params.tenant,
                    document_ids=gone[start : start + DELETE_BATCH],
                )
            ),
        )
        chunks += reply.deleted
    for document_id in gone:
        log.info("%s: deleted (gone from the source)", uris[document_id] or document_id)
    return {
        "documents_deleted": len(gone),
        "chunks_deleted": chunks,
        "deleted": [{"document_id": d, "uri": uris[d]} for d in gone],
    }


# --- summarize ------------------------------------------------------------------------

_COUNTS = ("seen", "new", "changed", "reindexed", "unchanged", "failed", "skipped")
_CHUNKS = ("chunks_embedded", "chunks_written", "chunks_deleted")


def summarize(
    params: Params,
    reports: Sequence[Mapping[str, Any]],
    removal: Mapping[str, Any] | None,
    started_at: str | datetime,
) -> dict[str, Any]:
    """The run summary from the batch reports, prepare()'s "removal" (None when it did
    not run) and prepare()'s "started_at": ``{"collection", "tenant", "seen", "new",
    "changed", "reindexed", "unchanged", "deleted", "failed", "skipped", "failures",
    "skips", "chunks_embedded", "chunks_written", "chunks_deleted", "seconds",
    "summary"}``, where "summary" is one line for the log."""
    checked = parse_params(params)
    started = datetime.fromisoformat(started_at) if isinstance(started_at, str) else started_at
    totals: dict[str, Any] = {
        key: sum(int(r[key]) for r in reports) for key in (*_COUNTS, *_CHUNKS)
    }
    totals["deleted"] = int(removal["documents_deleted"]) if removal else 0
    totals["chunks_deleted"] += int(removal["chunks_deleted"]) if removal else 0
    seconds = round((datetime.now(UTC) - started).total_seconds(), 3)
    line = (
        f"collection {checked.collection!r}: {totals['seen']} documents seen, "
        f"{totals['new']} new, {totals['changed']} changed, {totals['reindexed']} reindexed, "
        f"{totals['unchanged']} unchanged, {totals['deleted']} deleted, "
        f"{totals['failed']} failed, {totals['skipped']} skipped; "
        f"{totals['chunks_written']} chunks written ({totals['chunks_embedded']} embedded) "
        f"in {seconds:.1f} s"
    )
    log.info("%s", line)
    return {
        "collection": checked.collection,
        "tenant": checked.tenant,
        **totals,
        "failures": [f for r in reports for f in r["failures"]],
        "skips": [s for r in reports for s in r["skips"]],
        "seconds": seconds,
        "summary": line,
    }
