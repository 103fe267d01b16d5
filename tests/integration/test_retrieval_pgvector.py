"""What only the pgvector backend has: schema migrations, and a database that goes away and
comes back while the service runs. Each test here owns its PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from daert.clients.services import RetrievalClient
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess
from daert.v1 import common_pb2, retrieval_pb2


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pgdata")
    server.start()
    yield server
    server.stop()


def _server(dsn: str) -> ServerProcess:
    # A short readiness interval, so health follows the database within a second.
    return ServerProcess(
        "retrieval",
        {
            "DAERT_RETRIEVAL_DSN": dsn,
            "DAERT_RETRIEVAL_HEALTH_INTERVAL_S": "0.5",
            "DAERT_RETRIEVAL_CONNECT_TIMEOUT_S": "2",
        },
    )


async def _upsert_one(client: RetrievalClient, name: str, id: str) -> None:
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                retrieval_pb2.Chunk(id=id, text=id, vector=common_pb2.Vector(values=[1, 0, 1]))
            ],
        )
    )


async def test_postgres_restart_mid_run(own_postgres: EmbeddedPostgres) -> None:
    with _server(own_postgres.dsn) as server:
        server.wait_health("SERVING")
        async with RetrievalClient(server.target, max_attempts=1) as client:
            await client.stub.CreateCollection(
                retrieval_pb2.CreateCollectionRequest(collection="kept", dimensions=3)
            )
            await _upsert_one(client, "kept", "before")

            own_postgres.stop()
            # UNAVAILABLE, not DEADLINE_EXCEEDED: the service's 2 s connect timeout gave up
            # long before the call's 30 s deadline; a hang would be the deadline's error.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.Search(
                    retrieval_pb2.SearchRequest(collection="kept", query_text="before"),
                    timeout=30,
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            server.wait_health("NOT_SERVING", timeout_s=10)

            own_postgres.start()
            server.wait_health("SERVING", timeout_s=15)
            # Pooled connections broken by the restart are replaced, not handed out.
            await _upsert_one(client, "kept", "after")
            got = await client.stub.Get(
                retrieval_pb2.GetRequest(collection="kept", ids=["before", "after"])
            )
            assert [c.id for c in got.chunks] == ["before", "after"]


async def test_starts_without_database_and_serves_once_it_appears(tmp_path: Path) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pgdata")
    dsn = postgres.start()
    postgres.stop()
    with _server(dsn) as server:
        server.wait_health("NOT_SERVING")
        async with RetrievalClient(server.target, max_attempts=1) as client:
            # As above: a hang would be DEADLINE_EXCEEDED at the 30 s deadline.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.ListCollections(
                    retrieval_pb2.ListCollectionsRequest(), timeout=30
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            try:
                postgres.start()
                server.wait_health("SERVING", timeout_s=15)
                listed = await client.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
                assert list(listed.collections) == []
            finally:
                postgres.stop()


def test_migrations_apply_once_across_restarts(own_postgres: EmbeddedPostgres) -> None:
    for _ in range(2):
        with _server(own_postgres.dsn) as server:
            server.wait_health("SERVING")
    with psycopg.connect(own_postgres.dsn) as conn:
        versions = conn.execute("SELECT version FROM daert_schema_migrations").fetchall()
        extension = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    assert versions == [(1,)]
    assert extension is not None


async def test_collection_dropped_by_another_replica_is_not_found(
    own_postgres: EmbeddedPostgres,
) -> None:
    with _server(own_postgres.dsn) as first, _server(own_postgres.dsn) as second:
        first.wait_health("SERVING")
        second.wait_health("SERVING")
        async with (
            RetrievalClient(first.target) as a,
            RetrievalClient(second.target) as b,
        ):
            await a.stub.CreateCollection(
                retrieval_pb2.CreateCollectionRequest(collection="docs", dimensions=3)
            )
            await _upsert_one(b, "docs", "x")  # b now has the collection cached
            await a.stub.DeleteCollection(retrieval_pb2.DeleteCollectionRequest(collection="docs"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _upsert_one(b, "docs", "y")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # Recreated with other settings: b follows the new definition.
            await a.stub.CreateCollection(
                retrieval_pb2.CreateCollectionRequest(collection="docs", dimensions=3)
            )
            await _upsert_one(b, "docs", "z")


async def test_text_search_language_must_exist(postgres: EmbeddedPostgres) -> None:
    with _server(postgres.dsn) as server:
        server.wait_health("SERVING")
        async with RetrievalClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.CreateCollection(
                    retrieval_pb2.CreateCollectionRequest(
                        collection="klingon", dimensions=3, text_search_language="klingon"
                    )
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("text_search_language")
            german = await client.stub.CreateCollection(
                retrieval_pb2.CreateCollectionRequest(
                    collection="german", dimensions=3, text_search_language="german"
                )
            )
            await client.stub.Upsert(
                retrieval_pb2.UpsertRequest(
                    collection="german",
                    chunks=[
                        retrieval_pb2.Chunk(
                            id="h",
                            text="Die Häuser stehen am Fluss",
                            vector=common_pb2.Vector(values=[1, 0, 0]),
                        )
                    ],
                )
            )
            # German stemming: the dative plural "Häusern" shares the stem of "Häuser".
            hits = await client.stub.Search(
                retrieval_pb2.SearchRequest(collection="german", query_text="Häusern")
            )
            assert german.collection.text_search_language == "german"
            assert [h.chunk.id for h in hits.hits] == ["h"]


async def test_deadline_cancels_the_database_query(own_postgres: EmbeddedPostgres) -> None:
    """A caller's deadline reaches PostgreSQL: the blocked query is cancelled there, not
    left running after the caller has gone."""
    with _server(own_postgres.dsn) as server:
        server.wait_health("SERVING")
        async with RetrievalClient(server.target, max_attempts=1) as client:
            await client.stub.CreateCollection(
                retrieval_pb2.CreateCollectionRequest(collection="locked", dimensions=3)
            )
            await _upsert_one(client, "locked", "x")
            with psycopg.connect(own_postgres.dsn, autocommit=True) as admin:
                (table_id,) = admin.execute("SELECT id FROM daert_collections").fetchone() or (0,)
                with admin.transaction():
                    # Hold a lock every read of the table must wait for.
                    admin.execute(f"LOCK TABLE daert_chunks_{table_id} IN ACCESS EXCLUSIVE MODE")
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await client.stub.Search(
                            retrieval_pb2.SearchRequest(collection="locked", query_text="x"),
                            timeout=1.0,
                        )
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    # Polled: only a query that keeps waiting takes the whole 30 s.
                    deadline = time.monotonic() + 30.0
                    waiting = None
                    while time.monotonic() < deadline:
                        waiting = admin.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                        ).fetchone()
                        if waiting == (0,):
                            break
                        await asyncio.sleep(0.1)
                    assert waiting == (0,), "the query kept waiting after the caller gave up"
            # The connection that ran the cancelled query is fine for the next call.
            hits = await client.stub.Search(
                retrieval_pb2.SearchRequest(collection="locked", query_text="x")
            )
            assert [h.chunk.id for h in hits.hits] == ["x"]
