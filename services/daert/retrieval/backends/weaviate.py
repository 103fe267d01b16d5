"""Weaviate (client v4, gRPC + REST): one multi-tenant Weaviate collection per collection name,
one Weaviate tenant per (tenant, collection), and a catalog collection of our settings.

Mapping:
- Collection `name` -> Weaviate collection `Daert_<name>` (our names are [a-z][a-z0-9_]*, so
  the result is a valid, case-collision-free class name), multi-tenancy on, one self-provided
  vector ("default") in an HNSW index.
- Tenant -> the Weaviate tenant of the same name; the default (empty) tenant is `_default`,
  which our tenant names (starting with a letter or digit) can never be. Every read and write
  goes through `collection.with_tenant(...)`, so tenants are isolated by Weaviate itself.
- `DaertCatalog`, a collection without tenants, holds one object per (tenant, collection)
  with what CreateCollection asked for (dimensions, metric, HNSW, language, created_at); its
  uuid is derived from tenant and name, so creating the same collection twice collides.
- Chunk -> one object with uuid5(chunk id), vector, and properties chunk_id, document_id
  (as given, not indexed), doc_key (uuid5 of the document id: exact, indexed), text (BM25),
  content_hash, metadata_json (the metadata as stored, returned verbatim) and the flattened
  metadata that filters use (see weaviate_filter).

Differences from pgvector, all forced by Weaviate:
- Metric and HNSW parameters belong to the Weaviate collection, so every tenant's collection
  of one name must share them: creating it again with others is FAILED_PRECONDITION.
  Dimensions are per tenant (each tenant has its own index) and may differ.
- No transactions: ReplaceDocument writes the new chunks, then deletes the document's others,
  so a reader may briefly see both (`atomic_replace = False`). A deletion that fails half-way
  can leave an orphan Weaviate tenant; creating the collection again clears it.
- ef_search is ignored: Weaviate sets ef per collection, not per query; its dynamic ef
  (top_k * 8, clamped to 100..500) applies.
- Keyword search is BM25 over word tokens with Weaviate's English stop words and no stemming,
  whatever text_search_language says (the language is stored and reported as given).
- ListDocuments reads every matching chunk (without its vector) for each page, as Weaviate
  cannot group outside a search; pgvector groups in SQL.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import logging
import math
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import grpc
import httpx
import numpy as np
import weaviate
from grpc_health.v1 import health_pb2, health_pb2_grpc
from weaviate.classes.aggregate import GroupByAggregate
from weaviate.classes.config import (
    Configure,
    DataType,
    Property,
    Tokenization,
    VectorDistances,
)
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter as WeaviateFilter
from weaviate.classes.query import MetadataQuery, Sort
from weaviate.classes.tenants import Tenant
from weaviate.collections import CollectionAsync
from weaviate.collections.classes.config import CollectionConfig, _VectorIndexConfigHNSW
from weaviate.collections.classes.filters import _Filters
from weaviate.exceptions import (
    AuthenticationFailedError,
    InsufficientPermissionsError,
    UnexpectedStatusCodeError,
    WeaviateBaseError,
    WeaviateClosedClientError,
    WeaviateConnectionError,
    WeaviateGRPCUnavailableError,
    WeaviateRetryError,
    WeaviateStartUpError,
    WeaviateTimeoutError,
)
from weaviate.util import generate_uuid5

from daert.retrieval.backends.weaviate_filter import (
    KEYS_PROPERTY,
    Compiled,
    compile_filter,
    flatten,
    property_kind,
)
from daert.retrieval.config import RetrievalSettings
from daert.retrieval.filters import Filter
from daert.retrieval.model import (
    ChunkRecord,
    CollectionInfo,
    CollectionSpec,
    DocumentSummary,
    Metric,
    ScoredChunk,
    Vector,
    WriteCounts,
    canonical_json,
)
from daert.runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ServiceError,
    Unavailable,
)

log = logging.getLogger("daert.retrieval.weaviate")

T = TypeVar("T")
P = ParamSpec("P")
Shard = CollectionAsync[Any, Any]  # a Weaviate collection, scoped to one tenant or not

CATALOG = "DaertCatalog"
CLASS_PREFIX = "Daert_"
DEFAULT_TENANT = "_default"
VECTOR_NAME = "default"
PAGE = 1000  # objects per read; well below Weaviate's QUERY_MAXIMUM_RESULTS (10,000)
MAX_BATCH_OBJECTS = 200
MAX_BATCH_BYTES = 8 * 1024 * 1024  # a rough bound per insert request (gRPC limit: 100 MiB)
# A call still running after this long makes us probe the server: the client retries
# refused gRPC calls for about a minute, and a server that is down should be UNAVAILABLE now.
PROBE_AFTER_S = 0.5
_RETURNED = ["chunk_id", "document_id", "text", "metadata_json"]
_LISTED = ["chunk_id", "document_id", "metadata_json"]  # what ListDocuments reads
_NO_UUID = UUID(int=0)  # never a uuid5: `id != it` matches every chunk

_DISTANCES = {
    Metric.COSINE: VectorDistances.COSINE,
    Metric.DOT: VectorDistances.DOT,
    Metric.L2: VectorDistances.L2_SQUARED,
}
_METRICS = {distance: metric for metric, distance in _DISTANCES.items()}


def class_name(collection: str) -> str:
    return CLASS_PREFIX + collection


def weaviate_tenant(tenant: str) -> str:
    return tenant or DEFAULT_TENANT


def chunk_uuid(chunk_id: str) -> UUID:
    return UUID(generate_uuid5(chunk_id, "daert/chunk/"))


def document_key(document_id: str) -> str:
    return generate_uuid5(document_id, "daert/document/")


def catalog_uuid(tenant: str, name: str) -> UUID:
    return UUID(generate_uuid5(f"{weaviate_tenant(tenant)}/{name}", "daert/collection/"))


def _similarity(metric: Metric, distance: float) -> float:
    """Weaviate's distance as the contract's similarity: higher is closer."""
    # cosine: 1 - cosine similarity; dot: the negated inner product; l2-squared: the
    # squared Euclidean distance, whose root pgvector (and the contract) reports.
    if metric is Metric.COSINE:
        return 1.0 - distance
    if metric is Metric.DOT:
        return -distance
    return -math.sqrt(max(distance, 0.0))


def _text(
    name: str, *, filterable: bool = False, tokenization: Tokenization = Tokenization.FIELD
) -> Property:
    return Property(
        name=name,
        data_type=DataType.TEXT,
        tokenization=tokenization,
        index_filterable=filterable,
        index_searchable=False,
    )


_CHUNK_PROPERTIES = [
    _text("chunk_id"),
    _text("document_id"),
    _text("doc_key", filterable=True),
    Property(
        name="text",
        data_type=DataType.TEXT,
        tokenization=Tokenization.WORD,
        index_filterable=False,
        index_searchable=True,
    ),
    _text("content_hash"),
    _text("metadata_json"),
    Property(
        name=KEYS_PROPERTY,
        data_type=DataType.TEXT_ARRAY,
        tokenization=Tokenization.FIELD,
        index_filterable=True,
        index_searchable=False,
    ),
]

_CATALOG_PROPERTIES = [
    _text("tenant"),
    _text("tenant_key", filterable=True),
    _text("name"),
    Property(name="dimensions", data_type=DataType.INT, index_filterable=False),
    _text("metric"),
    Property(name="hnsw_m", data_type=DataType.INT, index_filterable=False),
    Property(name="hnsw_ef_construction", data_type=DataType.INT, index_filterable=False),
    _text("text_search_language"),
    Property(name="created_at", data_type=DataType.DATE, index_filterable=False),
]


def _metadata_property(name: str) -> Property:
    kind = property_kind(name)
    if kind == "s":
        return Property(
            name=name,
            data_type=DataType.TEXT_ARRAY,
            tokenization=Tokenization.FIELD,
            index_filterable=True,
            index_searchable=False,
        )
    data_type = DataType.NUMBER_ARRAY if kind == "n" else DataType.BOOL_ARRAY
    return Property(name=name, data_type=data_type, index_filterable=True)


def _guarded(
    method: Callable[Concatenate[WeaviateBackend, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[WeaviateBackend, P], Coroutine[Any, Any, T]]:
    """A backend operation run through `WeaviateBackend._call`: its failures become service
    errors, and a dead server UNAVAILABLE within PROBE_AFTER_S. A CollectionSpec argument
    names the collection a NOT_FOUND is about."""

    @functools.wraps(method)
    async def guarded(self: WeaviateBackend, /, *args: P.args, **kwargs: P.kwargs) -> T:
        spec = next((arg for arg in args if isinstance(arg, CollectionSpec)), None)
        return await self._call(method(self, *args, **kwargs), spec)

    return guarded


class WeaviateBackend:
    kind = "weaviate"
    atomic_replace = False

    def __init__(self, settings: RetrievalSettings) -> None:
        assert settings.weaviate_url is not None
        self._settings = settings
        url = urlsplit(settings.weaviate_url)
        self._secure = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._http_port = url.port or (443 if self._secure else 80)
        self._grpc_host = settings.weaviate_grpc_host or self._host
        self._grpc_port = settings.weaviate_grpc_port
        self._url = f"{url.scheme}://{url.netloc}"
        self._timeout = settings.connect_timeout_s
        self._api_key = (
            settings.weaviate_api_key.get_secret_value() if settings.weaviate_api_key else None
        )
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._connecting: asyncio.Task[weaviate.WeaviateAsyncClient] | None = None
        self._http: httpx.AsyncClient | None = None
        self._health: grpc.aio.Channel | None = None
        self._last_problem: str | None = None
        # (tenant, name) -> catalog entry. Collections are immutable once created, so the
        # only staleness is a collection dropped by another replica, caught on use.
        self._catalog: dict[tuple[str, str], CollectionInfo] = {}
        # Weaviate collection -> the names of its properties, as last read or added.
        self._properties: dict[str, set[str]] = {}
        # Serialise schema changes to one Weaviate collection (create, drop, new properties).
        self._class_locks: dict[str, asyncio.Lock] = {}
        # Serialise replacements of one document, so their deletes do not interleave.
        self._document_locks: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Lock]
        self._document_locks = weakref.WeakValueDictionary()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._connected()
        except Unavailable as exc:
            log.warning("Weaviate is not reachable yet; serving once it is: %s", exc.message)

    async def ready(self) -> bool:
        try:
            await self._connected()
            problem = await self._probe()
        except Unavailable as exc:
            problem = exc.message
        if problem != self._last_problem and problem is not None:
            log.warning("Weaviate is not ready: %s", problem)
        self._last_problem = problem
        return problem is None

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._http is not None:
            await self._http.aclose()
        if self._health is not None:
            await self._health.close()

    async def _connected(self) -> weaviate.WeaviateAsyncClient:
        """The connected client. Connecting runs as a task of its own, so a caller that gives
        up (a readiness check with a short timeout) does not abort it for the next one."""
        if self._client is not None:
            return self._client
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect())
            self._connecting.add_done_callback(_consume)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> weaviate.WeaviateAsyncClient:
        client = weaviate.use_async_with_custom(
            http_host=self._host,
            http_port=self._http_port,
            http_secure=self._secure,
            grpc_host=self._grpc_host,
            grpc_port=self._grpc_port,
            grpc_secure=self._secure,
            auth_credentials=Auth.api_key(self._api_key) if self._api_key else None,
            # init bounds connecting; query and insert keep the client's defaults (30 s and
            # 90 s): a server that is down is detected by probing instead (see _call).
            additional_config=AdditionalConfig(timeout=Timeout(init=self._timeout)),
            # The init checks would also ask pypi.org for the newest client version.
            skip_init_checks=True,
        )
        try:
            async with asyncio.timeout(2 * self._timeout):
                await client.connect()
                await self._ensure_catalog(client)
        except BaseException as exc:
            await client.close()
            if isinstance(exc, Exception) and not isinstance(exc, ServiceError):
                raise Unavailable(
                    f"Weaviate at {self._url} is not reachable: {_describe(exc)}"
                ) from None
            raise
        self._client = client
        log.info("connected to Weaviate at %s (gRPC port %d)", self._url, self._grpc_port)
        return client

    async def _probe(self) -> str | None:
        """Why Weaviate cannot serve now (REST readiness and gRPC health), or None."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        try:
            reply = await self._http.get(f"{self._url}/v1/.well-known/ready")
        except httpx.HTTPError as exc:
            return f"Weaviate at {self._url} is not reachable: {_describe(exc)}"
        if reply.status_code != 200:
            return f"Weaviate at {self._url} is not ready (HTTP {reply.status_code})"
        if self._health is None:
            target = f"{self._grpc_host}:{self._grpc_port}"
            self._health = (
                grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
                if self._secure
                else grpc.aio.insecure_channel(target)
            )
        metadata = [("authorization", f"Bearer {self._api_key}")] if self._api_key else None
        try:
            await health_pb2_grpc.HealthStub(self._health).Check(
                health_pb2.HealthCheckRequest(), timeout=self._timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return (
                f"Weaviate's gRPC port {self._grpc_host}:{self._grpc_port} does not answer: "
                f"{exc.code().name} {exc.details() or ''}".rstrip()
            )
        return None

    async def _call(self, operation: Awaitable[T], spec: CollectionSpec | None = None) -> T:
        """Run one operation against Weaviate, its failures turned into service errors.

        The client retries a gRPC call refused with UNAVAILABLE for about a minute, so an
        operation still running after PROBE_AFTER_S probes the server: if it is down, the
        operation is abandoned as UNAVAILABLE; if it is up, it is left to finish."""
        task = asyncio.ensure_future(operation)
        task.add_done_callback(_consume)
        try:
            while not (await asyncio.wait({task}, timeout=PROBE_AFTER_S))[0]:
                problem = await self._probe()
                if problem is not None:
                    raise Unavailable(problem)
        finally:
            if not task.done():
                task.cancel()
        try:
            return task.result()
        except ServiceError:
            raise
        except Exception as exc:
            raise self._translate(exc, spec) from None

    def _translate(self, exc: Exception, spec: CollectionSpec | None) -> Exception:
        message = _describe(exc)
        lowered = _chain_text(exc)
        if isinstance(exc, WeaviateTimeoutError | TimeoutError) or "deadline exceeded" in lowered:
            return DeadlineExceeded(f"Weaviate did not answer in time: {message}")
        if isinstance(
            exc,
            WeaviateConnectionError
            | WeaviateStartUpError
            | WeaviateRetryError
            | WeaviateClosedClientError
            | WeaviateGRPCUnavailableError
            | httpx.TransportError
            | OSError,
        ):
            return Unavailable(f"Weaviate at {self._url} is not reachable: {message}")
        if isinstance(exc, AuthenticationFailedError | InsufficientPermissionsError):
            return Unavailable(f"Weaviate refused the retrieval service's credentials: {message}")
        if spec is not None and (
            _is_missing(exc)
            or (isinstance(exc, UnexpectedStatusCodeError) and exc.status_code == 404)
        ):
            self._catalog.pop((spec.tenant, spec.name), None)
            return NotFound(f"collection {spec.name!r} does not exist for tenant {spec.tenant!r}")
        if "vector dimensions do not match" in lowered or "vector lengths don't match" in lowered:
            return FailedPrecondition(
                f"Weaviate holds vectors of another length in this collection: {message}"
            )
        if "not active" in lowered or "tenant is cold" in lowered or "frozen" in lowered:
            return FailedPrecondition(f"the Weaviate tenant is not active: {message}")
        if isinstance(exc, WeaviateBaseError):
            return ServiceError(f"Weaviate failed: {message}")
        return exc

    # --- catalog ---------------------------------------------------------------------------

    async def _ensure_catalog(self, client: weaviate.WeaviateAsyncClient) -> None:
        if await client.collections.exists(CATALOG):
            return
        try:
            await client.collections.create(
                CATALOG,
                properties=_CATALOG_PROPERTIES,
                vector_config=Configure.Vectors.self_provided(),
            )
        except UnexpectedStatusCodeError as exc:
            if "already exists" not in str(exc):  # another replica was first
                raise

    async def _read_catalog(self, tenant: str, name: str) -> CollectionInfo | None:
        client = await self._connected()
        try:
            found = await client.collections.use(CATALOG).query.fetch_object_by_id(
                catalog_uuid(tenant, name)
            )
        except WeaviateBaseError as exc:
            if not _is_missing(exc):
                raise
            await self._ensure_catalog(client)  # a Weaviate that lost its data: start afresh
            return None
        return _info(found.properties) if found is not None else None

    def _lock(self, weaviate_class: str) -> asyncio.Lock:
        return self._class_locks.setdefault(weaviate_class, asyncio.Lock())

    # --- collections -----------------------------------------------------------------------

    async def create_collection(
        self, spec: CollectionSpec, if_not_exists: bool
    ) -> tuple[CollectionInfo, bool]:
        return await self._call(self._create_collection(spec, if_not_exists))

    async def _create_collection(
        self, spec: CollectionSpec, if_not_exists: bool
    ) -> tuple[CollectionInfo, bool]:
        client = await self._connected()
        weaviate_class, tenant = class_name(spec.name), weaviate_tenant(spec.tenant)
        async with self._lock(weaviate_class):
            existing = await self._read_catalog(spec.tenant, spec.name)
            if existing is not None:
                return self._existing(existing, spec, if_not_exists)
            collection = await self._ensure_class(client, spec)
            await collection.tenants.create([Tenant(name=tenant)])
            # Milliseconds: what Weaviate's date type keeps in every version.
            now = datetime.now(UTC)
            info = CollectionInfo(spec, now.replace(microsecond=now.microsecond // 1000 * 1000))
            try:
                await client.collections.use(CATALOG).data.insert(
                    _catalog_properties(info), uuid=catalog_uuid(spec.tenant, spec.name)
                )
            except UnexpectedStatusCodeError as exc:
                if "already exists" not in str(exc):
                    raise
                # Another replica created it between our read and our insert.
                existing = await self._read_catalog(spec.tenant, spec.name)
                if existing is None:
                    raise
                return self._existing(existing, spec, if_not_exists)
            # Chunks left by a deletion that failed half-way must not show up in the new
            # collection: start its tenant afresh.
            shard = collection.with_tenant(tenant)
            if (await shard.aggregate.over_all(total_count=True)).total_count:
                await collection.tenants.remove([tenant])
                await collection.tenants.create([Tenant(name=tenant)])
        self._catalog[(spec.tenant, spec.name)] = info
        return info, True

    def _existing(
        self, existing: CollectionInfo, wanted: CollectionSpec, if_not_exists: bool
    ) -> tuple[CollectionInfo, bool]:
        self._catalog[(wanted.tenant, wanted.name)] = existing
        if if_not_exists and existing.spec == wanted:
            return existing, False
        if existing.spec == wanted:
            raise AlreadyExists(
                f"collection {wanted.name!r} already exists (set if_not_exists to reuse it)"
            )
        raise AlreadyExists(
            f"collection {wanted.name!r} already exists with different settings "
            f"({existing.spec.dimensions} dimensions, {existing.spec.metric.value} metric)"
        )

    async def _ensure_class(
        self, client: weaviate.WeaviateAsyncClient, spec: CollectionSpec
    ) -> Shard:
        """The Weaviate collection for `spec.name`, created if missing; FAILED_PRECONDITION
        when it exists with another metric or other HNSW parameters."""
        weaviate_class = class_name(spec.name)
        collection: Shard = client.collections.use(weaviate_class)
        if not await client.collections.exists(weaviate_class):
            try:
                await client.collections.create(
                    weaviate_class,
                    properties=_CHUNK_PROPERTIES,
                    multi_tenancy_config=Configure.multi_tenancy(
                        enabled=True, auto_tenant_creation=False, auto_tenant_activation=False
                    ),
                    vector_config=Configure.Vectors.self_provided(
                        name=VECTOR_NAME,
                        vector_index_config=Configure.VectorIndex.hnsw(
                            distance_metric=_DISTANCES[spec.metric],
                            max_connections=spec.hnsw_m,
                            ef_construction=spec.hnsw_ef_construction,
                        ),
                    ),
                )
                self._properties[weaviate_class] = {p.name for p in _CHUNK_PROPERTIES}
                return collection
            except UnexpectedStatusCodeError as exc:
                if "already exists" not in str(exc):  # another replica was first
                    raise
        config = await collection.config.get()
        _check_class(config, spec)
        self._properties[weaviate_class] = {p.name for p in config.properties}
        return collection

    @_guarded
    async def delete_collection(self, tenant: str, name: str) -> int | None:
        client = await self._connected()
        weaviate_class, weaviate_name = class_name(name), weaviate_tenant(tenant)
        async with self._lock(weaviate_class):
            self._catalog.pop((tenant, name), None)
            if await self._read_catalog(tenant, name) is None:
                return None
            collection = client.collections.use(weaviate_class)
            try:
                counted = await collection.with_tenant(weaviate_name).aggregate.over_all(
                    total_count=True
                )
                count = counted.total_count or 0
            except WeaviateBaseError as exc:
                if not _is_missing(exc):
                    raise
                count = 0
            # The catalog entry goes first: from then on the collection does not exist.
            await client.collections.use(CATALOG).data.delete_by_id(catalog_uuid(tenant, name))
            if await client.collections.exists(weaviate_class):
                await collection.tenants.remove([weaviate_name])
                if not await collection.tenants.get():
                    # The last tenant is gone: so are the shared metric and HNSW settings.
                    await client.collections.delete(weaviate_class)
                    self._properties.pop(weaviate_class, None)
        return count

    @_guarded
    async def list_collections(self, tenant: str) -> list[CollectionInfo]:
        client = await self._connected()
        try:
            objects = await _fetch_all(
                client.collections.use(CATALOG),
                WeaviateFilter.by_property("tenant_key").equal(weaviate_tenant(tenant)),
                properties=None,
                include_vectors=False,
            )
        except WeaviateBaseError as exc:
            if not _is_missing(exc):
                raise
            await self._ensure_catalog(client)  # a Weaviate that lost its data: start afresh
            return []
        infos = sorted((_info(o.properties) for o in objects), key=lambda i: i.spec.name)
        return list(await asyncio.gather(*(self._with_counts(info, True) for info in infos)))

    async def describe(self, tenant: str, name: str, counts: bool = False) -> CollectionInfo:
        cached = self._catalog.get((tenant, name))
        if cached is not None and not counts:
            return cached
        return await self._call(self._describe(tenant, name, counts))

    async def _describe(self, tenant: str, name: str, counts: bool) -> CollectionInfo:
        info = await self._read_catalog(tenant, name)
        if info is None:
            self._catalog.pop((tenant, name), None)
            raise NotFound(f"collection {name!r} does not exist for tenant {tenant!r}")
        self._catalog[(tenant, name)] = info
        return await self._with_counts(info) if counts else info

    async def _with_counts(
        self, info: CollectionInfo, tolerate_missing: bool = False
    ) -> CollectionInfo:
        shard = await self._shard(info.spec)
        try:
            total = (await shard.aggregate.over_all(total_count=True)).total_count or 0
            documents = 0
            if total:
                grouped = await shard.aggregate.over_all(
                    total_count=True, group_by=GroupByAggregate(prop="doc_key", limit=total)
                )
                no_document = document_key("")
                documents = sum(1 for g in grouped.groups if g.grouped_by.value != no_document)
        except WeaviateBaseError as exc:
            if not (tolerate_missing and _is_missing(exc)):  # being deleted right now
                raise
            total = documents = 0
        return CollectionInfo(info.spec, info.created_at, total, documents)

    async def _shard(self, spec: CollectionSpec) -> Shard:
        client = await self._connected()
        collection: Shard = client.collections.use(class_name(spec.name))
        return collection.with_tenant(weaviate_tenant(spec.tenant))

    # --- chunks ----------------------------------------------------------------------------

    async def upsert(self, spec: CollectionSpec, chunks: Sequence[ChunkRecord]) -> WriteCounts:
        upserted = await self._call(self._write(spec, chunks), spec)
        return WriteCounts(upserted=upserted, unchanged=len(chunks) - upserted)

    @_guarded
    async def replace_document(
        self, spec: CollectionSpec, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> WriteCounts:
        key = (spec.tenant, spec.name, document_id)
        lock = self._document_locks.get(key)
        if lock is None:
            lock = self._document_locks[key] = asyncio.Lock()
        async with lock:
            # New chunks first, then the old ones go: a reader may see both for a moment,
            # never neither.
            upserted = await self._write(spec, chunks)
            stale = WeaviateFilter.by_property("doc_key").equal(document_key(document_id))
            if chunks:
                stale = stale & WeaviateFilter.by_id().contains_none(
                    [chunk_uuid(c.id) for c in chunks]
                )
            deleted = await _delete_where(await self._shard(spec), stale)
        return WriteCounts(upserted, len(chunks) - upserted, deleted)

    async def _write(self, spec: CollectionSpec, chunks: Sequence[ChunkRecord]) -> int:
        """Write the chunks whose content hash differs from the stored one; returns how
        many were written."""
        if not chunks:
            return 0
        shard = await self._shard(spec)
        uuids = [chunk_uuid(chunk.id) for chunk in chunks]
        stored: dict[UUID, str] = {}
        for start in range(0, len(uuids), PAGE):
            page = uuids[start : start + PAGE]
            found = await shard.query.fetch_objects(
                filters=WeaviateFilter.by_id().contains_any(page),
                limit=len(page),
                return_properties=["content_hash"],
            )
            stored.update({o.uuid: str(o.properties.get("content_hash")) for o in found.objects})
        objects = []
        for uuid, chunk in zip(uuids, chunks, strict=True):
            digest = chunk.content_hash().hex()
            if stored.get(uuid) != digest:
                objects.append(_object(uuid, chunk, digest))
        if not objects:
            return 0
        await self._ensure_properties(spec, {name for o in objects for name in o.properties})
        for batch in _batches(objects):
            result = await shard.data.insert_many(batch)
            if result.errors:
                first = next(iter(result.errors.values()))
                raise self._translate(
                    WeaviateBaseError(
                        f"{len(result.errors)} of {len(batch)} chunks were not written: "
                        f"{first.message}"
                    ),
                    spec,
                )
        return len(objects)

    async def _ensure_properties(self, spec: CollectionSpec, names: Iterable[str]) -> None:
        """Create the metadata properties the chunks about to be written need. Created
        explicitly, as Weaviate's auto-schema would guess other types and tokenization."""
        weaviate_class = class_name(spec.name)
        wanted = set(names)
        # Read afresh, not from the cache: another replica may have dropped and created the
        # collection again without them, and Weaviate's auto-schema would make up a property
        # written without being defined.
        if wanted <= await self._known_properties(weaviate_class, refresh=True):
            return
        async with self._lock(weaviate_class):
            known = await self._known_properties(weaviate_class, refresh=True)
            collection = (await self._connected()).collections.use(weaviate_class)
            for name in sorted(wanted - known):
                try:
                    await collection.config.add_property(_metadata_property(name))
                except WeaviateBaseError as exc:
                    # Added meanwhile by another replica: the client or the server says so.
                    if "already exists" not in str(exc) and "already in use" not in str(exc):
                        raise
                known.add(name)

    async def _known_properties(self, weaviate_class: str, refresh: bool = False) -> set[str]:
        known = self._properties.get(weaviate_class)
        if known is None or refresh:
            client = await self._connected()
            config = await client.collections.use(weaviate_class).config.get()
            known = self._properties[weaviate_class] = {p.name for p in config.properties}
        return known

    @_guarded
    async def get(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        include_vectors: bool,
    ) -> list[ChunkRecord]:
        shard = await self._shard(spec)
        rows: dict[str, ChunkRecord] = {}
        wanted = list(dict.fromkeys(ids))
        for start in range(0, len(wanted), PAGE):
            page = wanted[start : start + PAGE]
            found = await shard.query.fetch_objects(
                filters=WeaviateFilter.by_id().contains_any([chunk_uuid(i) for i in page]),
                limit=len(page),
                return_properties=_RETURNED,
                include_vector=include_vectors,
            )
            rows.update((r.id, r) for r in (_record(o, include_vectors) for o in found.objects))
        documents = list(dict.fromkeys(document_ids))
        for start in range(0, len(documents), PAGE):
            keys = [document_key(d) for d in documents[start : start + PAGE]]
            found_objects = await _fetch_all(
                shard,
                WeaviateFilter.by_property("doc_key").contains_any(keys),
                properties=_RETURNED,
                include_vectors=include_vectors,
            )
            rows.update((r.id, r) for r in (_record(o, include_vectors) for o in found_objects))
        ordered = sorted(rows.values(), key=lambda c: (c.document_id, c.id))
        chunks = [rows[i] for i in wanted if i in rows]
        seen = {chunk.id for chunk in chunks}
        for document_id in documents:
            for chunk in ordered:
                if chunk.document_id == document_id and chunk.id not in seen:
                    chunks.append(chunk)
                    seen.add(chunk.id)
        return chunks

    @_guarded
    async def list_documents(
        self,
        spec: CollectionSpec,
        document_ids: Sequence[str],
        where: Filter | None,
        limit: int,
        after: str,
    ) -> list[DocumentSummary]:
        shard = await self._shard(spec)
        scope = (
            WeaviateFilter.by_property("doc_key").contains_any(
                [document_key(d) for d in dict.fromkeys(document_ids)]
            )
            if document_ids
            else WeaviateFilter.by_property("doc_key").not_equal(document_key(""))
        )

        # Weaviate groups objects only within a vector or keyword search, and document_id is
        # neither filterable nor sortable (doc_key, its hash, is): so every matching chunk is
        # read, without vectors, and grouped here, keeping one metadata per document.
        async def run(condition: _Filters | None) -> list[DocumentSummary]:
            counts: dict[str, int] = {}
            first: dict[str, tuple[str, str]] = {}  # document id -> (chunk id, metadata_json)
            matching = scope if condition is None else scope & condition
            async for page in _pages(shard, matching, _LISTED, include_vectors=False):
                for obj in page:
                    properties = obj.properties
                    document_id = str(properties.get("document_id") or "")
                    if not document_id or document_id <= after:
                        continue
                    counts[document_id] = counts.get(document_id, 0) + 1
                    chunk_id = str(properties["chunk_id"])
                    held = first.get(document_id)
                    if held is None or chunk_id < held[0]:
                        first[document_id] = (chunk_id, str(properties["metadata_json"]))
            return [
                DocumentSummary(d, counts[d], json.loads(first[d][1]))
                for d in heapq.nsmallest(limit, counts)
            ]

        return await self._filtered(spec, where, run, [])

    @_guarded
    async def delete(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        where: Filter | None,
    ) -> int:
        shard = await self._shard(spec)
        if ids:
            uuids = [chunk_uuid(i) for i in dict.fromkeys(ids)]
            return await _delete_where(shard, WeaviateFilter.by_id().contains_any(uuids))
        if document_ids:
            keys = [document_key(d) for d in dict.fromkeys(document_ids)]
            return await _delete_where(
                shard, WeaviateFilter.by_property("doc_key").contains_any(keys)
            )
        assert where is not None

        async def run(condition: _Filters | None) -> int:
            everything = WeaviateFilter.by_id().not_equal(_NO_UUID)
            return await _delete_where(shard, condition or everything)

        return await self._filtered(spec, where, run, 0)

    # --- search ----------------------------------------------------------------------------

    @_guarded
    async def vector_search(
        self,
        spec: CollectionSpec,
        vector: Vector,
        top_k: int,
        where: Filter | None,
        ef_search: int,  # Weaviate has no per-query ef: its dynamic ef applies
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        shard = await self._shard(spec)
        query = [float(x) for x in vector]

        async def run(condition: _Filters | None) -> list[ScoredChunk]:
            found = await shard.query.near_vector(
                near_vector=query,
                limit=top_k,
                filters=condition,
                return_metadata=MetadataQuery(distance=True),
                return_properties=_RETURNED,
                include_vector=include_vectors,
            )
            return [
                ScoredChunk(
                    _record(o, include_vectors),
                    _similarity(spec.metric, float(o.metadata.distance or 0.0)),
                )
                for o in found.objects
            ]

        return await self._filtered(spec, where, run, [])

    @_guarded
    async def keyword_search(
        self,
        spec: CollectionSpec,
        text: str,
        top_k: int,
        where: Filter | None,
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        shard = await self._shard(spec)

        async def run(condition: _Filters | None) -> list[ScoredChunk]:
            found = await shard.query.bm25(
                query=text,
                query_properties=["text"],
                limit=top_k,
                filters=condition,
                return_metadata=MetadataQuery(score=True),
                return_properties=_RETURNED,
                include_vector=include_vectors,
            )
            hits = [
                ScoredChunk(_record(o, include_vectors), float(o.metadata.score or 0.0))
                for o in found.objects
            ]
            # Ties in id order, as pgvector breaks them.
            return sorted(hits, key=lambda hit: (-hit.score, hit.chunk.id))

        return await self._filtered(spec, where, run, [])

    async def _filtered(
        self,
        spec: CollectionSpec,
        where: Filter | None,
        run: Callable[[_Filters | None], Awaitable[T]],
        nothing: T,
    ) -> T:
        """Run a query under a metadata filter. A filter on keys no chunk ever had is decided
        here (Weaviate refuses filters on unknown properties); a property dropped meanwhile
        (the collection deleted and created again elsewhere) is looked up once more."""
        if where is None:
            return await run(None)
        weaviate_class = class_name(spec.name)
        for attempt in range(2):
            known = await self._known_properties(weaviate_class, refresh=attempt > 0)
            compiled: Compiled
            compiled, missing = compile_filter(where, known)
            if missing and attempt == 0:
                # Perhaps another replica added them since we looked.
                known = await self._known_properties(weaviate_class, refresh=True)
                compiled, _ = compile_filter(where, known)
            if compiled is False:
                return nothing
            try:
                return await run(None if compiled is True else compiled)
            except WeaviateBaseError as exc:
                if attempt or "no such prop" not in str(exc):
                    raise
        raise AssertionError("unreachable")


# --- helpers ---------------------------------------------------------------------------------


def _consume(task: asyncio.Future[Any]) -> None:
    """Mark a background task's failure as seen (it is reported to whoever awaits it)."""
    if not task.cancelled():
        task.exception()


def _describe(exc: BaseException) -> str:
    """The message of the root cause (the client's own wrappers add little but noise)."""
    while exc.__cause__ is not None and str(exc.__cause__).strip():
        exc = exc.__cause__
    return str(exc).strip() or type(exc).__name__


def _chain_text(exc: BaseException) -> str:
    """Every message along the chain of causes, lower-cased: what errors are matched on."""
    parts = []
    cause: BaseException | None = exc
    while cause is not None:
        parts.append(str(cause))
        cause = cause.__cause__
    return " | ".join(parts).lower()


def _is_missing(exc: BaseException) -> bool:
    message = _chain_text(exc)
    return "tenant not found" in message or "could not find class" in message


def _check_class(config: CollectionConfig, spec: CollectionSpec) -> None:
    vectors = config.vector_config or {}
    index = vectors[VECTOR_NAME].vector_index_config if VECTOR_NAME in vectors else None
    if not config.multi_tenancy_config.enabled or not isinstance(index, _VectorIndexConfigHNSW):
        raise FailedPrecondition(
            f"Weaviate collection {config.name!r} exists but was not created by this service"
        )
    metric = _METRICS.get(VectorDistances(index.distance_metric))
    have = (metric, index.max_connections, index.ef_construction)
    if have != (spec.metric, spec.hnsw_m, spec.hnsw_ef_construction):
        shown = metric.value if metric is not None else index.distance_metric
        raise FailedPrecondition(
            f"collection {spec.name!r} exists for other tenants with the {shown} metric and "
            f"HNSW m={index.max_connections}, ef_construction={index.ef_construction}; on "
            "Weaviate every tenant's collection of one name shares these settings "
            "(dimensions may differ)"
        )


def _catalog_properties(info: CollectionInfo) -> dict[str, Any]:
    spec = info.spec
    return {
        "tenant": spec.tenant,
        "tenant_key": weaviate_tenant(spec.tenant),
        "name": spec.name,
        "dimensions": spec.dimensions,
        "metric": spec.metric.value,
        "hnsw_m": spec.hnsw_m,
        "hnsw_ef_construction": spec.hnsw_ef_construction,
        "text_search_language": spec.text_search_language,
        "created_at": info.created_at,
    }


def _info(properties: Mapping[str, Any]) -> CollectionInfo:
    spec = CollectionSpec(
        tenant=str(properties.get("tenant") or ""),
        name=str(properties["name"]),
        dimensions=int(properties["dimensions"]),
        metric=Metric(properties["metric"]),
        hnsw_m=int(properties["hnsw_m"]),
        hnsw_ef_construction=int(properties["hnsw_ef_construction"]),
        text_search_language=str(properties["text_search_language"]),
    )
    created_at = properties["created_at"]
    assert isinstance(created_at, datetime)
    return CollectionInfo(spec=spec, created_at=created_at)


def _object(uuid: UUID, chunk: ChunkRecord, digest: str) -> DataObject[dict[str, Any], None]:
    assert chunk.vector is not None
    properties: dict[str, Any] = {
        "chunk_id": chunk.id,
        "document_id": chunk.document_id,
        "doc_key": document_key(chunk.document_id),
        "text": chunk.text,
        "content_hash": digest,
        "metadata_json": canonical_json(chunk.metadata),
        **flatten(chunk.metadata),
    }
    return DataObject(properties=properties, uuid=uuid, vector=[float(x) for x in chunk.vector])


def _batches(
    objects: list[DataObject[dict[str, Any], None]],
) -> Iterable[list[DataObject[dict[str, Any], None]]]:
    """Insert requests of bounded size (vectors dominate: about 10 bytes per dimension)."""
    batch: list[DataObject[dict[str, Any], None]] = []
    size = 0
    for obj in objects:
        properties = obj.properties
        assert properties is not None
        vector = obj.vector
        weight = (
            len(properties["text"])
            + len(properties["metadata_json"]) * 2
            + 10 * (len(vector) if isinstance(vector, list) else 0)
            + 512
        )
        if batch and (len(batch) >= MAX_BATCH_OBJECTS or size + weight > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(obj)
        size += weight
    if batch:
        yield batch


def _record(obj: Any, include_vectors: bool) -> ChunkRecord:
    properties = obj.properties
    vector = None
    if include_vectors:
        vector = np.asarray(obj.vector[VECTOR_NAME], dtype=np.float32)
    return ChunkRecord(
        id=str(properties["chunk_id"]),
        document_id=str(properties.get("document_id") or ""),
        text=str(properties.get("text") or ""),
        metadata=json.loads(properties.get("metadata_json") or "{}"),
        vector=vector,
    )


async def _fetch_all(
    collection: Shard,
    where: _Filters,
    properties: list[str] | None,
    include_vectors: bool,
) -> list[Any]:
    """Every object matching `where`."""
    return [
        obj async for page in _pages(collection, where, properties, include_vectors) for obj in page
    ]


async def _pages(
    collection: Shard,
    where: _Filters,
    properties: list[str] | None,
    include_vectors: bool,
) -> AsyncIterator[list[Any]]:
    """The objects matching `where`, a page at a time, paged by uuid (offsets stop at
    QUERY_MAXIMUM_RESULTS, and Weaviate's cursor does not combine with filters)."""
    last: UUID | None = None
    while True:
        condition = where
        if last is not None:
            condition = where & WeaviateFilter.by_property("_id").greater_than(str(last))
        page = await collection.query.fetch_objects(
            filters=condition,
            sort=Sort.by_property("_id"),
            limit=PAGE,
            return_properties=properties,
            include_vector=include_vectors,
        )
        yield page.objects
        if len(page.objects) < PAGE:
            return
        last = page.objects[-1].uuid


async def _delete_where(shard: Shard, where: _Filters) -> int:
    """Delete every object matching `where`; returns how many. Weaviate deletes at most
    QUERY_MAXIMUM_RESULTS objects per call, so this repeats until none match."""
    deleted = 0
    while True:
        result = await shard.data.delete_many(where=where)
        deleted += result.successful
        if result.failed:
            raise ServiceError(f"Weaviate failed to delete {result.failed} chunks")
        if result.matches == 0 or result.successful == 0:
            return deleted
