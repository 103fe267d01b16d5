"""RetrievalService: request validation, protobuf conversion and hybrid fusion; storage and
ranking live in `backends/`."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from daert.retrieval.backends import create_backend
from daert.retrieval.config import RetrievalSettings
from daert.retrieval.filters import Filter, parse_filter
from daert.retrieval.fusion import FusedHit, Fusion, fuse
from daert.retrieval.model import (
    ChunkRecord,
    CollectionInfo,
    CollectionSpec,
    DocumentSummary,
    Metric,
    ScoredChunk,
    Vector,
)
from daert.runtime.errors import InvalidArgument, NotFound, ServiceError
from daert.runtime.validation import require
from daert.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

COLLECTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
# Also valid as a Weaviate tenant name; empty is the default tenant.
TENANT_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,62})?")
LANGUAGE_NAME = re.compile(r"[a-z_]{1,63}")
MAX_ID_CHARS = 512
DEFAULT_TOP_K = 10
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

METRICS = {
    retrieval_pb2.DISTANCE_METRIC_UNSPECIFIED: Metric.COSINE,
    retrieval_pb2.DISTANCE_METRIC_COSINE: Metric.COSINE,
    retrieval_pb2.DISTANCE_METRIC_DOT: Metric.DOT,
    retrieval_pb2.DISTANCE_METRIC_L2: Metric.L2,
}
METRIC_ENUM = {
    Metric.COSINE: retrieval_pb2.DISTANCE_METRIC_COSINE,
    Metric.DOT: retrieval_pb2.DISTANCE_METRIC_DOT,
    Metric.L2: retrieval_pb2.DISTANCE_METRIC_L2,
}
FUSIONS = {
    retrieval_pb2.HYBRID_FUSION_UNSPECIFIED: Fusion.RRF,
    retrieval_pb2.HYBRID_FUSION_RRF: Fusion.RRF,
    retrieval_pb2.HYBRID_FUSION_RELATIVE_SCORE: Fusion.RELATIVE_SCORE,
}
VECTOR, KEYWORD, HYBRID = (
    retrieval_pb2.SEARCH_MODE_VECTOR,
    retrieval_pb2.SEARCH_MODE_KEYWORD,
    retrieval_pb2.SEARCH_MODE_HYBRID,
)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, settings: RetrievalSettings) -> None:
        self._settings = settings
        self._backend = create_backend(settings)

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self, server)
        return [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name]

    async def start(self) -> None:
        await self._backend.start()

    async def ready(self) -> bool:
        return await self._backend.ready()

    async def close(self) -> None:
        await self._backend.close()

    # --- collections -----------------------------------------------------------------------

    async def CreateCollection(
        self, request: retrieval_pb2.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.CreateCollectionResponse:
        tenant, name = _tenant(request.tenant), _collection(request.collection)
        limit = self._settings.max_dimensions
        require(0 < request.dimensions <= limit, "dimensions", f"must be between 1 and {limit}")
        metric = METRICS.get(request.metric)
        require(metric is not None, "metric", f"unknown value {request.metric}")
        assert metric is not None
        m = request.hnsw.m or self._settings.default_hnsw_m
        ef_construction = (
            request.hnsw.ef_construction or self._settings.default_hnsw_ef_construction
        )
        require(2 <= m <= 100, "hnsw.m", "must be between 2 and 100")
        require(
            2 * m <= ef_construction <= 1000,
            "hnsw.ef_construction",
            f"must be between 2 * m ({2 * m}) and 1000",
        )
        language = request.text_search_language or "english"
        require(
            LANGUAGE_NAME.fullmatch(language) is not None,
            "text_search_language",
            "must be a lower-case language name such as english, german or simple",
        )
        spec = CollectionSpec(
            tenant, name, request.dimensions, metric, m, ef_construction, language
        )
        info, created = await self._backend.create_collection(spec, request.if_not_exists)
        return retrieval_pb2.CreateCollectionResponse(
            collection=_collection_message(info), created=created
        )

    async def DeleteCollection(
        self, request: retrieval_pb2.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.DeleteCollectionResponse:
        tenant, name = _tenant(request.tenant), _collection(request.collection)
        deleted = await self._backend.delete_collection(tenant, name)
        if deleted is None and not request.allow_missing:
            raise NotFound(f"collection {name!r} does not exist for tenant {tenant!r}")
        return retrieval_pb2.DeleteCollectionResponse(
            deleted=deleted is not None, chunks_deleted=deleted or 0
        )

    async def ListCollections(
        self, request: retrieval_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ListCollectionsResponse:
        infos = await self._backend.list_collections(_tenant(request.tenant))
        return retrieval_pb2.ListCollectionsResponse(
            collections=[_collection_message(info) for info in infos]
        )

    async def GetCollection(
        self, request: retrieval_pb2.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetCollectionResponse:
        tenant, name = _tenant(request.tenant), _collection(request.collection)
        info = await self._backend.describe(tenant, name, counts=True)
        return retrieval_pb2.GetCollectionResponse(collection=_collection_message(info))

    # --- chunks ----------------------------------------------------------------------------

    async def Upsert(
        self, request: retrieval_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.UpsertResponse:
        spec = await self._spec(request.tenant, request.collection)
        require(len(request.chunks) > 0, "chunks", "at least one chunk is required")
        chunks = self._chunks(request.chunks, spec)
        counts = await self._backend.upsert(spec, chunks)
        return retrieval_pb2.UpsertResponse(upserted=counts.upserted, unchanged=counts.unchanged)

    async def ReplaceDocument(
        self, request: retrieval_pb2.ReplaceDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ReplaceDocumentResponse:
        spec = await self._spec(request.tenant, request.collection)
        document_id = request.document_id
        require(bool(document_id), "document_id", "must not be empty")
        require(len(document_id) <= MAX_ID_CHARS, "document_id", f"at most {MAX_ID_CHARS} chars")
        for i, chunk in enumerate(request.chunks):
            require(
                chunk.document_id in ("", document_id),
                f"chunks[{i}].document_id",
                f"must be empty or {document_id!r}",
            )
        chunks = self._chunks(request.chunks, spec)
        for record in chunks:
            record.document_id = document_id
        counts = await self._backend.replace_document(spec, document_id, chunks)
        return retrieval_pb2.ReplaceDocumentResponse(
            upserted=counts.upserted, unchanged=counts.unchanged, deleted=counts.deleted
        )

    async def Get(
        self, request: retrieval_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetResponse:
        spec = await self._spec(request.tenant, request.collection)
        ids, document_ids = list(request.ids), list(request.document_ids)
        require(bool(ids or document_ids), "ids", "set ids, document_ids or both")
        limit = self._settings.max_chunks_per_write
        require(len(ids) <= limit, "ids", f"at most {limit} ids per call")
        require(len(document_ids) <= limit, "document_ids", f"at most {limit} per call")
        chunks = await self._backend.get(spec, ids, document_ids, request.include_vectors)
        found = {chunk.id for chunk in chunks}
        return retrieval_pb2.GetResponse(
            chunks=[_chunk_message(chunk) for chunk in chunks],
            missing_ids=[i for i in dict.fromkeys(ids) if i not in found],
        )

    async def ListDocuments(
        self, request: retrieval_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ListDocumentsResponse:
        spec = await self._spec(request.tenant, request.collection)
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        require(
            0 < page_size <= MAX_PAGE_SIZE, "page_size", f"must be between 1 and {MAX_PAGE_SIZE}"
        )
        limit = self._settings.max_chunks_per_write
        require(len(request.document_ids) <= limit, "document_ids", f"at most {limit} per call")
        where = _filter(request.filter) if request.HasField("filter") else None
        after = _page_after(request.page_token)
        # One more than a page: whether it comes back tells if there is a next page.
        found = await self._backend.list_documents(
            spec, list(request.document_ids), where, page_size + 1, after
        )
        page = found[:page_size]
        more = len(found) > page_size
        return retrieval_pb2.ListDocumentsResponse(
            documents=[_document_message(document) for document in page],
            next_page_token=_page_token(page[-1].document_id) if more else "",
        )

    async def Delete(
        self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.DeleteResponse:
        spec = await self._spec(request.tenant, request.collection)
        given = [
            name
            for name, present in (
                ("ids", bool(request.ids)),
                ("document_ids", bool(request.document_ids)),
                ("filter", request.HasField("filter")),
            )
            if present
        ]
        require(len(given) == 1, "ids", "set exactly one of ids, document_ids and filter")
        where = None
        if request.HasField("filter"):
            where = _filter(request.filter)
            require(
                where is not None,
                "filter",
                "an empty filter would delete every chunk; use DeleteCollection for that",
            )
        deleted = await self._backend.delete(
            spec, list(request.ids), list(request.document_ids), where
        )
        return retrieval_pb2.DeleteResponse(deleted=deleted)

    # --- search ----------------------------------------------------------------------------

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        spec = await self._spec(request.tenant, request.collection)
        settings = self._settings
        top_k = request.top_k or DEFAULT_TOP_K
        require(
            0 < top_k <= settings.max_top_k, "top_k", f"must be between 1 and {settings.max_top_k}"
        )
        mode = _mode(request)
        vector = None
        if mode in (VECTOR, HYBRID):
            require(request.HasField("query_vector"), "query_vector", "is required in this mode")
            vector = _vector(request.query_vector.values, spec, "query_vector")
        text = request.query_text.strip()
        if mode in (KEYWORD, HYBRID):
            require(bool(text), "query_text", "must not be empty in this mode")
        ef_search = request.ef_search or settings.default_ef_search
        require(
            0 < ef_search <= settings.max_ef_search,
            "ef_search",
            f"must be between 1 and {settings.max_ef_search}",
        )
        ef_search = max(ef_search, top_k)
        vector_weight = request.vector_weight if request.HasField("vector_weight") else 0.5
        require(0.0 <= vector_weight <= 1.0, "vector_weight", "must be between 0 and 1")
        fusion = FUSIONS.get(request.fusion)
        require(fusion is not None, "fusion", f"unknown value {request.fusion}")
        assert fusion is not None
        where = _filter(request.filter) if request.HasField("filter") else None
        include = request.include_vectors

        if mode == VECTOR:
            assert vector is not None
            ranked = await self._backend.vector_search(
                spec, vector, top_k, where, ef_search, include
            )
            hits = [
                FusedHit(s.chunk, s.score, vector_rank=i, vector_score=s.score)
                for i, s in enumerate(ranked, start=1)
            ]
        elif mode == KEYWORD:
            ranked = await self._backend.keyword_search(spec, text, top_k, where, include)
            hits = [
                FusedHit(s.chunk, s.score, keyword_rank=i, keyword_score=s.score)
                for i, s in enumerate(ranked, start=1)
            ]
        else:
            assert vector is not None
            depth = max(top_k, settings.hybrid_candidates)
            vector_ranked, keyword_ranked = await _both(
                self._backend.vector_search(
                    spec, vector, depth, where, max(ef_search, depth), include
                ),
                self._backend.keyword_search(spec, text, depth, where, include),
            )
            hits = fuse(vector_ranked, keyword_ranked, vector_weight, fusion)
        if request.HasField("min_score"):
            hits = [hit for hit in hits if hit.score >= request.min_score]
        return retrieval_pb2.SearchResponse(
            hits=[_hit_message(hit) for hit in hits[:top_k]], mode=mode
        )

    # --- helpers ---------------------------------------------------------------------------

    async def _spec(self, tenant: str, collection: str) -> CollectionSpec:
        info = await self._backend.describe(_tenant(tenant), _collection(collection))
        return info.spec

    def _chunks(
        self, messages: Sequence[retrieval_pb2.Chunk], spec: CollectionSpec
    ) -> list[ChunkRecord]:
        limit = self._settings.max_chunks_per_write
        require(len(messages) <= limit, "chunks", f"{len(messages)} chunks; at most {limit}")
        max_chars = self._settings.max_chunk_text_chars
        seen: dict[str, int] = {}
        chunks = []
        for i, message in enumerate(messages):
            where = f"chunks[{i}]"
            require(
                0 < len(message.id) <= MAX_ID_CHARS,
                f"{where}.id",
                f"must have 1 to {MAX_ID_CHARS} characters",
            )
            first = seen.setdefault(message.id, i)
            require(first == i, f"{where}.id", f"repeats chunks[{first}].id {message.id!r}")
            require(
                len(message.document_id) <= MAX_ID_CHARS,
                f"{where}.document_id",
                f"at most {MAX_ID_CHARS} characters",
            )
            require(
                len(message.text) <= max_chars, f"{where}.text", f"at most {max_chars} characters"
            )
            require("\x00" not in message.text, f"{where}.text", "must not contain NUL")
            require(message.HasField("vector"), f"{where}.vector", "is required")
            chunks.append(
                ChunkRecord(
                    id=message.id,
                    document_id=message.document_id,
                    text=message.text,
                    metadata=_json(message.metadata, f"{where}.metadata"),
                    vector=_vector(message.vector.values, spec, f"{where}.vector"),
                )
            )
        return chunks


Ranking = Coroutine[Any, Any, list[ScoredChunk]]


async def _both(first: Ranking, second: Ranking) -> tuple[list[ScoredChunk], list[ScoredChunk]]:
    """Run two searches at once; if one fails, the other is cancelled. The task group
    reports failures as an ExceptionGroup: its first service error is re-raised as itself,
    so a database restart under both searches is UNAVAILABLE (which clients retry), not
    INTERNAL."""
    try:
        async with asyncio.TaskGroup() as group:
            a, b = group.create_task(first), group.create_task(second)
    except* ServiceError as failed:
        raise failed.exceptions[0] from None
    return a.result(), b.result()


def _tenant(tenant: str) -> str:
    require(
        TENANT_NAME.fullmatch(tenant) is not None,
        "tenant",
        "must be empty or 1 to 63 characters of [A-Za-z0-9_-], starting with a letter or digit",
    )
    return tenant


def _collection(name: str) -> str:
    require(
        COLLECTION_NAME.fullmatch(name) is not None,
        "collection",
        "must be 1 to 63 characters of [a-z0-9_], starting with a letter",
    )
    return name


def _mode(request: retrieval_pb2.SearchRequest) -> retrieval_pb2.SearchMode.ValueType:
    mode = request.mode
    require(mode in retrieval_pb2.SearchMode.values(), "mode", f"unknown value {mode}")
    if mode != retrieval_pb2.SEARCH_MODE_UNSPECIFIED:
        return mode
    has_vector, has_text = request.HasField("query_vector"), bool(request.query_text.strip())
    require(has_vector or has_text, "query_vector", "set query_vector, query_text or both")
    if has_vector and has_text:
        return HYBRID
    return VECTOR if has_vector else KEYWORD


def _vector(values: Sequence[float], spec: CollectionSpec, field: str) -> Vector:
    require(
        len(values) == spec.dimensions,
        field,
        f"has {len(values)} dimensions; collection {spec.name!r} has {spec.dimensions}",
    )
    vector = np.asarray(values, dtype=np.float32)
    require(bool(np.isfinite(vector).all()), field, "must not contain NaN or Inf")
    if spec.metric is Metric.COSINE:
        require(bool(vector.any()), field, "an all-zero vector has no cosine similarity")
    return vector


def _json(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A Struct as plain JSON values; JSON has no NaN or Infinity, so neither may a Struct."""
    try:
        return json_format.MessageToDict(struct)
    except ValueError:
        raise InvalidArgument(field, "numbers must be finite (no NaN or Inf)") from None


def _filter(struct: struct_pb2.Struct) -> Filter | None:
    return parse_filter(_json(struct, "filter"))


def _page_token(last_document_id: str) -> str:
    """The opaque token of the page after the one ending with `last_document_id`."""
    return base64.urlsafe_b64encode(last_document_id.encode()).decode()


def _page_after(token: str) -> str:
    """The document id a page token continues after; "" (the start) for no token."""
    if not token:
        return ""
    try:
        after = base64.b64decode(token, altchars=b"-_", validate=True).decode()
    except ValueError:  # not base64, or not UTF-8
        after = ""
    # Only tokens this service made: re-encoding gives the same token, and no NUL (which
    # PostgreSQL refuses in text) or empty id, which no page ends with.
    require(
        bool(after) and "\x00" not in after and _page_token(after) == token,
        "page_token",
        "is not a next_page_token of ListDocuments",
    )
    return after


def _collection_message(info: CollectionInfo) -> retrieval_pb2.Collection:
    spec = info.spec
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(info.created_at)
    return retrieval_pb2.Collection(
        name=spec.name,
        tenant=spec.tenant,
        dimensions=spec.dimensions,
        metric=METRIC_ENUM[spec.metric],
        hnsw=retrieval_pb2.HnswParams(m=spec.hnsw_m, ef_construction=spec.hnsw_ef_construction),
        chunk_count=info.chunk_count,
        document_count=info.document_count,
        text_search_language=spec.text_search_language,
        created_at=created,
    )


def _chunk_message(chunk: ChunkRecord) -> retrieval_pb2.Chunk:
    message = retrieval_pb2.Chunk(id=chunk.id, document_id=chunk.document_id, text=chunk.text)
    message.metadata.update(chunk.metadata)
    if chunk.vector is not None:
        message.vector.CopyFrom(common_pb2.Vector(values=chunk.vector.tolist()))
    return message


def _document_message(document: DocumentSummary) -> retrieval_pb2.DocumentSummary:
    message = retrieval_pb2.DocumentSummary(
        document_id=document.document_id, chunk_count=document.chunk_count
    )
    message.metadata.update(document.metadata)
    return message


def _hit_message(hit: FusedHit) -> retrieval_pb2.SearchHit:
    return retrieval_pb2.SearchHit(
        chunk=_chunk_message(hit.chunk),
        score=hit.score,
        vector_rank=hit.vector_rank,
        vector_score=hit.vector_score,
        keyword_rank=hit.keyword_rank,
        keyword_score=hit.keyword_score,
    )
