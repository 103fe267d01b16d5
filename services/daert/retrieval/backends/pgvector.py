"""PostgreSQL + pgvector: a catalog table of collections and one chunk table per collection
(HNSW index on the vector, GIN on the tsvector and on the JSONB metadata)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from daert.retrieval.backends.pg_filter import compile_filter
from daert.retrieval.backends.pg_schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    MIGRATIONS_TABLE,
    chunk_table,
    create_chunk_table,
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
)
from daert.runtime.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
)
from daert.runtime.postgres import PostgresDatabase

log = logging.getLogger("daert.retrieval.pgvector")

_DISTANCE_OPERATOR = {Metric.COSINE: "<=>", Metric.DOT: "<#>", Metric.L2: "<->"}


def _similarity(metric: Metric, distance: float) -> float:
    """pgvector's distance as the contract's similarity: higher is closer."""
    # <=> is 1 - cosine; <#> is the negated inner product; <-> is the L2 distance.
    return 1.0 - distance if metric is Metric.COSINE else -distance


@dataclass(frozen=True)
class _Stored:
    id: int  # catalog id: names the chunk table
    info: CollectionInfo


class PgvectorBackend:
    kind = "pgvector"
    atomic_replace = True

    def __init__(self, settings: RetrievalSettings) -> None:
        assert settings.dsn is not None
        self._settings = settings
        self._db = PostgresDatabase(
            settings.dsn.get_secret_value(),
            migrations=MIGRATIONS,
            migrations_table=MIGRATIONS_TABLE,
            lock_key=MIGRATION_LOCK,
            pool_min_size=settings.pool_min_size,
            pool_max_size=settings.pool_max_size,
            connect_timeout_s=settings.connect_timeout_s,
            configure=register_vector_async,
        )
        # hnsw.ef_search as last set on each pooled connection.
        self._ef_search: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], int] = (
            weakref.WeakKeyDictionary()
        )
        # (tenant, name) -> catalog entry. Collections are immutable once created, so the
        # only staleness is a collection dropped by another replica, caught on use.
        self._catalog: dict[tuple[str, str], _Stored] = {}

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._db.start()

    async def ready(self) -> bool:
        return await self._db.ready()

    async def close(self) -> None:
        await self._db.close()

    # --- collections -----------------------------------------------------------------------

    async def create_collection(
        self, spec: CollectionSpec, if_not_exists: bool
    ) -> tuple[CollectionInfo, bool]:
        async with self._db.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT 1 FROM pg_ts_config WHERE cfgname = %s", (spec.text_search_language,)
            )
            if await cursor.fetchone() is None:
                raise InvalidArgument(
                    "text_search_language",
                    f"{spec.text_search_language!r} is not a PostgreSQL text search "
                    "configuration (e.g. english, german, simple)",
                )
            # Serialise creators of the same name, so exactly one of them creates it.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"{spec.tenant}/{spec.name}",),
            )
            existing = await self._lookup(conn, spec.tenant, spec.name)
            if existing is not None:
                if if_not_exists and existing.info.spec == spec:
                    return existing.info, False
                raise AlreadyExists(_exists_message(existing.info.spec, spec))
            cursor = await conn.execute(
                """INSERT INTO daert_collections (tenant, name, dimensions, metric, hnsw_m,
                       hnsw_ef_construction, text_search_language)
                   VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id, created_at""",
                (
                    spec.tenant,
                    spec.name,
                    spec.dimensions,
                    spec.metric.value,
                    spec.hnsw_m,
                    spec.hnsw_ef_construction,
                    spec.text_search_language,
                ),
            )
            row = await cursor.fetchone()
            assert row is not None
            for statement in create_chunk_table(row[0], spec):
                await conn.execute(statement)
        info = CollectionInfo(spec=spec, created_at=row[1])
        self._catalog[(spec.tenant, spec.name)] = _Stored(row[0], info)
        return info, True

    async def delete_collection(self, tenant: str, name: str) -> int | None:
        self._catalog.pop((tenant, name), None)
        async with self._db.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT id FROM daert_collections WHERE tenant = %s AND name = %s FOR UPDATE",
                (tenant, name),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            table = chunk_table(row[0])
            cursor = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE tenant = %s").format(table), (tenant,)
            )
            counted = await cursor.fetchone()
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))
            await conn.execute("DELETE FROM daert_collections WHERE id = %s", (row[0],))
        return int(counted[0]) if counted else 0

    async def list_collections(self, tenant: str) -> list[CollectionInfo]:
        async with self._db.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT * FROM daert_collections WHERE tenant = %s ORDER BY name", (tenant,)
            )
            stored = [_stored_from_row(row) for row in await cursor.fetchall()]
            return [await self._with_counts(conn, entry) for entry in stored]

    async def describe(self, tenant: str, name: str, counts: bool = False) -> CollectionInfo:
        cached = self._catalog.get((tenant, name))
        if cached is not None and not counts:
            return cached.info
        async with self._db.connection() as conn:
            entry = await self._lookup(conn, tenant, name)
            if entry is None:
                raise NotFound(f"collection {name!r} does not exist for tenant {tenant!r}")
            self._catalog[(tenant, name)] = entry
            return await self._with_counts(conn, entry) if counts else entry.info

    async def _lookup(
        self, conn: psycopg.AsyncConnection[Any], tenant: str, name: str
    ) -> _Stored | None:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            "SELECT * FROM daert_collections WHERE tenant = %s AND name = %s", (tenant, name)
        )
        row = await cursor.fetchone()
        return _stored_from_row(row) if row else None

    async def _with_counts(
        self, conn: psycopg.AsyncConnection[Any], entry: _Stored
    ) -> CollectionInfo:
        cursor = await conn.execute(
            sql.SQL(
                "SELECT count(*), count(DISTINCT document_id) FILTER (WHERE document_id <> '') "
                "FROM {} WHERE tenant = %s"
            ).format(chunk_table(entry.id)),
            (entry.info.spec.tenant,),
        )
        row = await cursor.fetchone()
        assert row is not None
        info = entry.info
        return CollectionInfo(info.spec, info.created_at, int(row[0]), int(row[1]))

    @asynccontextmanager
    async def _table(
        self, spec: CollectionSpec
    ) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], sql.Identifier]]:
        """A connection and the collection's chunk table. If another replica dropped the
        collection since it was cached, the call fails NOT_FOUND and the entry is evicted."""
        entry = self._catalog.get((spec.tenant, spec.name))
        if entry is None:
            await self.describe(spec.tenant, spec.name)
            entry = self._catalog[(spec.tenant, spec.name)]
        try:
            async with self._db.connection() as conn:
                yield conn, chunk_table(entry.id)
        except psycopg.errors.UndefinedTable:
            self._catalog.pop((spec.tenant, spec.name), None)
            raise NotFound(f"collection {spec.name!r} was deleted") from None

    # --- chunks ----------------------------------------------------------------------------

    async def upsert(self, spec: CollectionSpec, chunks: Sequence[ChunkRecord]) -> WriteCounts:
        async with self._table(spec) as (conn, table), conn.transaction():
            upserted = await self._write(conn, table, spec.tenant, chunks)
        return WriteCounts(upserted=upserted, unchanged=len(chunks) - upserted)

    async def replace_document(
        self, spec: CollectionSpec, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> WriteCounts:
        async with self._table(spec) as (conn, table), conn.transaction():
            # Two replacements of one document must not interleave their deletes.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"{spec.tenant}/{spec.name}/{document_id}",),
            )
            upserted = await self._write(conn, table, spec.tenant, chunks)
            cursor = await conn.execute(
                sql.SQL(
                    "DELETE FROM {} WHERE tenant = %s AND document_id = %s AND id <> ALL(%s)"
                ).format(table),
                (spec.tenant, document_id, [chunk.id for chunk in chunks]),
            )
            deleted = cursor.rowcount
        return WriteCounts(upserted, len(chunks) - upserted, deleted)

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        table: sql.Identifier,
        tenant: str,
        chunks: Sequence[ChunkRecord],
    ) -> int:
        """Insert or update `chunks` in one statement; returns how many rows were written.
        Rows go in id order so that concurrent writers lock them in the same order."""
        if not chunks:
            return 0
        ordered = sorted(chunks, key=lambda chunk: chunk.id)
        cursor = await conn.execute(
            sql.SQL(
                """INSERT INTO {table} AS stored
                       (tenant, id, document_id, content_hash, text, embedding, metadata)
                   SELECT %s, * FROM unnest(
                       %s::text[], %s::text[], %s::bytea[], %s::text[], %s::vector[], %s::jsonb[])
                   ON CONFLICT (tenant, id) DO UPDATE SET
                       document_id = EXCLUDED.document_id,
                       content_hash = EXCLUDED.content_hash,
                       text = EXCLUDED.text,
                       embedding = EXCLUDED.embedding,
                       metadata = EXCLUDED.metadata,
                       updated_at = now()
                   WHERE stored.content_hash <> EXCLUDED.content_hash
                   RETURNING 1"""
            ).format(table=table),
            (
                tenant,
                [chunk.id for chunk in ordered],
                [chunk.document_id for chunk in ordered],
                [chunk.content_hash() for chunk in ordered],
                [chunk.text for chunk in ordered],
                [chunk.vector for chunk in ordered],
                [Jsonb(chunk.metadata) for chunk in ordered],
            ),
        )
        return cursor.rowcount

    async def get(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        include_vectors: bool,
    ) -> list[ChunkRecord]:
        async with self._table(spec) as (conn, table):
            cursor = await conn.execute(
                sql.SQL(
                    "SELECT {columns} FROM {table} WHERE tenant = %s "
                    "AND (id = ANY(%s) OR document_id = ANY(%s)) ORDER BY document_id, id"
                ).format(columns=_columns(include_vectors), table=table),
                (spec.tenant, list(ids), list(document_ids)),
            )
            rows = [_chunk(row, include_vectors) for row in await cursor.fetchall()]
        by_id = {chunk.id: chunk for chunk in rows}
        found = [by_id[i] for i in dict.fromkeys(ids) if i in by_id]
        seen = {chunk.id for chunk in found}
        for document_id in dict.fromkeys(document_ids):
            for chunk in rows:
                if chunk.document_id == document_id and chunk.id not in seen:
                    found.append(chunk)
                    seen.add(chunk.id)
        return found

    async def list_documents(
        self,
        spec: CollectionSpec,
        document_ids: Sequence[str],
        where: Filter | None,
        limit: int,
        after: str,
    ) -> list[DocumentSummary]:
        condition, params = _condition(where)
        if document_ids:
            condition = sql.SQL("{} AND document_id = ANY(%s)").format(condition)
            params.append(list(document_ids))
        async with self._table(spec) as (conn, table):
            # Ids compare in the "C" collation, byte order of UTF-8 and so code point order,
            # as on Weaviate. The page is grouped over the id columns alone; only its first
            # chunks' metadata is then read, by primary key.
            cursor = await conn.execute(
                sql.SQL(
                    """SELECT page.document_id, page.chunks, chunk.metadata FROM (
                           SELECT document_id, count(*) AS chunks,
                                  min(id COLLATE "C") AS first_id
                           FROM {table}
                           WHERE tenant = %s AND document_id <> ''
                               AND document_id COLLATE "C" > %s AND {condition}
                           GROUP BY document_id
                           ORDER BY document_id COLLATE "C" LIMIT %s) AS page
                       JOIN {table} AS chunk
                           ON chunk.tenant = %s AND chunk.id = page.first_id COLLATE "default"
                       ORDER BY page.document_id COLLATE "C"
                    """
                ).format(table=table, condition=condition),
                [spec.tenant, after, *params, limit, spec.tenant],
            )
            rows = await cursor.fetchall()
        return [DocumentSummary(row[0], int(row[1]), row[2]) for row in rows]

    async def delete(
        self,
        spec: CollectionSpec,
        ids: Sequence[str],
        document_ids: Sequence[str],
        where: Filter | None,
    ) -> int:
        condition: sql.Composable
        params: list[Any]
        if ids:
            condition, params = sql.SQL("id = ANY(%s)"), [list(ids)]
        elif document_ids:
            condition, params = sql.SQL("document_id = ANY(%s)"), [list(document_ids)]
        else:
            assert where is not None
            condition, params = compile_filter(where)
        async with self._table(spec) as (conn, table):
            cursor = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE tenant = %s AND {}").format(table, condition),
                [spec.tenant, *params],
            )
            return cursor.rowcount

    # --- search ----------------------------------------------------------------------------

    async def vector_search(
        self,
        spec: CollectionSpec,
        vector: Vector,
        top_k: int,
        where: Filter | None,
        ef_search: int,
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        operator = sql.SQL(_DISTANCE_OPERATOR[spec.metric])
        condition, params = _condition(where)
        async with self._table(spec) as (conn, table):
            # A session setting, changed only when this call needs another value than the
            # connection's last one: most calls are then a single statement.
            if self._ef_search.get(conn) != ef_search:
                await conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),)
                )
                self._ef_search[conn] = ef_search
            cursor = await conn.execute(
                sql.SQL(
                    "SELECT {columns}, embedding {op} %s AS distance FROM {table} "
                    "WHERE tenant = %s AND {condition} ORDER BY distance LIMIT %s"
                ).format(
                    columns=_columns(include_vectors),
                    op=operator,
                    table=table,
                    condition=condition,
                ),
                [vector, spec.tenant, *params, top_k],
            )
            rows = await cursor.fetchall()
        return [
            ScoredChunk(_chunk(row, include_vectors), _similarity(spec.metric, float(row[-1])))
            for row in rows
        ]

    async def keyword_search(
        self,
        spec: CollectionSpec,
        text: str,
        top_k: int,
        where: Filter | None,
        include_vectors: bool,
    ) -> list[ScoredChunk]:
        condition, params = _condition(where)
        async with self._table(spec) as (conn, table):
            cursor = await conn.execute(
                sql.SQL(
                    # Any query term may match (OR), ranked by ts_rank normalised by document
                    # length: plainto_tsquery ANDs the terms, so its '&'s become '|'s.
                    """WITH q AS (SELECT replace(plainto_tsquery(%s::regconfig, %s)::text,
                                                ' & ', ' | ')::tsquery AS query)
                       SELECT {columns}, ts_rank(tsv, q.query, 1) AS rank FROM {table}, q
                       WHERE tenant = %s AND tsv @@ q.query AND {condition}
                       ORDER BY rank DESC, id LIMIT %s"""
                ).format(columns=_columns(include_vectors), table=table, condition=condition),
                [spec.text_search_language, text, spec.tenant, *params, top_k],
            )
            rows = await cursor.fetchall()
        return [ScoredChunk(_chunk(row, include_vectors), float(row[-1])) for row in rows]


def _condition(where: Filter | None) -> tuple[sql.Composable, list[Any]]:
    return compile_filter(where) if where is not None else (sql.SQL("true"), [])


def _columns(include_vectors: bool) -> sql.Composable:
    names = ["id", "document_id", "text", "metadata"] + (["embedding"] if include_vectors else [])
    return sql.SQL(", ").join(map(sql.Identifier, names))


def _chunk(row: Sequence[Any], include_vectors: bool) -> ChunkRecord:
    """A chunk from a row of `_columns` (plus any trailing score columns)."""
    vector = np.asarray(row[4].to_numpy(), dtype=np.float32) if include_vectors else None
    return ChunkRecord(id=row[0], document_id=row[1], text=row[2], metadata=row[3], vector=vector)


def _stored_from_row(row: dict[str, Any]) -> _Stored:
    spec = CollectionSpec(
        tenant=row["tenant"],
        name=row["name"],
        dimensions=row["dimensions"],
        metric=Metric(row["metric"]),
        hnsw_m=row["hnsw_m"],
        hnsw_ef_construction=row["hnsw_ef_construction"],
        text_search_language=row["text_search_language"],
    )
    return _Stored(row["id"], CollectionInfo(spec=spec, created_at=row["created_at"]))


def _exists_message(existing: CollectionSpec, wanted: CollectionSpec) -> str:
    if existing == wanted:
        return f"collection {wanted.name!r} already exists (set if_not_exists to reuse it)"
    return (
        f"collection {wanted.name!r} already exists with different settings "
        f"({existing.dimensions} dimensions, {existing.metric.value} metric)"
    )
