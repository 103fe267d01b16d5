"""Retrieval on pgvector: recall@10 against exact search, and latency through the gRPC
service beside the same query sent as raw SQL straight to PostgreSQL, in one run.

100k seeded, clustered 384-d vectors (cosine) go in through Upsert (batch rate printed);
then, for two ef_search values, the same queries run through gRPC and as raw SQL in
interleaved rounds (medians reported: the machine is shared and noisy). QPS is with 8
concurrent callers on each path.

    make bench            # or: python bench/retrieval_bench.py --vectors 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import psycopg
from daert.clients.services import RetrievalClient
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess
from daert.v1 import common_pb2, retrieval_pb2
from pgvector.psycopg import register_vector_async

DIMENSIONS = 384
CLUSTERS = 200
# Spread within a cluster, against centres of unit length: neighbours are close but not
# trivially so (each coordinate's noise is comparable to the centre's).
NOISE = 0.05
TOP_K = 10
BATCH = 500
CONCURRENCY = 8
EF_SEARCH = (20, 100)


def clustered(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors scattered around the given cluster centres."""
    members = rng.integers(0, len(centres), size=count)
    points = centres[members] + rng.normal(scale=NOISE, size=(count, DIMENSIONS))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    scores = queries @ data.T  # unit vectors: cosine similarity
    return [set(np.argpartition(-row, TOP_K)[:TOP_K].tolist()) for row in scores]


async def load(client: RetrievalClient, data: np.ndarray) -> float:
    await client.stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(collection="bench", dimensions=DIMENSIONS)
    )
    started = time.perf_counter()
    for start in range(0, len(data), BATCH):
        chunks = [
            retrieval_pb2.Chunk(
                id=str(i),
                document_id=f"doc{i // 10}",
                text=f"chunk {i}",
                vector=common_pb2.Vector(values=data[i]),
            )
            for i in range(start, min(start + BATCH, len(data)))
        ]
        await client.stub.Upsert(
            retrieval_pb2.UpsertRequest(collection="bench", chunks=chunks), timeout=300
        )
        if (start // BATCH) % 40 == 0:
            print(f"  loaded {start + len(chunks):>7,} chunks", flush=True)
    return len(data) / (time.perf_counter() - started)


async def timed(calls: list[Callable[[], Awaitable[list[int]]]]) -> tuple[list[float], list]:
    latencies, results = [], []
    for call in calls:
        started = time.perf_counter()
        results.append(await call())
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, results


def recall(results: list[list[int]], truth: list[set[int]]) -> float:
    return statistics.mean(len(set(r) & t) / TOP_K for r, t in zip(results, truth, strict=True))


async def main(vectors: int, queries: int, rounds: int) -> None:
    rng = np.random.default_rng(20261121)
    centres = rng.normal(size=(CLUSTERS, DIMENSIONS)) / np.sqrt(DIMENSIONS)
    data = clustered(vectors, centres, rng)
    query_vectors = clustered(queries, centres, rng)  # new points from the same clusters
    truth = exact_top_k(data, query_vectors)

    with tempfile.TemporaryDirectory() as state:
        postgres = EmbeddedPostgres(Path(state) / "pgdata")
        dsn = postgres.start()
        try:
            env = {"DAERT_RETRIEVAL_DSN": dsn, "DAERT_RETRIEVAL_POOL_MAX_SIZE": str(CONCURRENCY)}
            with ServerProcess("retrieval", env) as server:
                server.wait_health("SERVING")
                async with RetrievalClient(server.target) as client:
                    print(f"upserting {vectors:,} x {DIMENSIONS}-d vectors, {BATCH} per call")
                    rate = await load(client, data)
                    await run_queries(client, dsn, query_vectors, truth, rounds, rate)
        finally:
            postgres.stop()


async def run_queries(
    client: RetrievalClient,
    dsn: str,
    query_vectors: np.ndarray,
    truth: list[set[int]],
    rounds: int,
    upsert_rate: float,
) -> None:
    # The table the service created for the collection: the catalog names it.
    connections = []
    for _ in range(CONCURRENCY):
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await register_vector_async(conn)
        connections.append(conn)
    (collection_id,) = (
        await (await connections[0].execute("SELECT id FROM daert_collections")).fetchone()
    ) or (0,)
    table = f"daert_chunks_{collection_id}"

    def via_grpc(vector: np.ndarray, ef: int) -> Callable[[], Awaitable[list[int]]]:
        async def call() -> list[int]:
            reply = await client.stub.Search(
                retrieval_pb2.SearchRequest(
                    collection="bench",
                    query_vector=common_pb2.Vector(values=vector),
                    top_k=TOP_K,
                    ef_search=ef,
                )
            )
            return [int(hit.chunk.id) for hit in reply.hits]

        return call

    def via_sql(vector: np.ndarray, conn: psycopg.AsyncConnection) -> Callable:
        # The statement the service sends, minus the service.
        async def call() -> list[int]:
            cursor = await conn.execute(
                f"SELECT id, document_id, text, metadata, embedding <=> %s AS distance "
                f"FROM {table} WHERE tenant = %s AND true ORDER BY distance LIMIT %s",
                (vector, "", TOP_K),
            )
            return [int(row[0]) for row in await cursor.fetchall()]

        return call

    print(
        f"\nupsert rate: {upsert_rate:,.0f} chunks/s (gRPC, {BATCH} chunks per call, "
        "HNSW maintained on insert)\n"
    )
    print(
        f"search top_k={TOP_K} over {len(query_vectors)} queries; {rounds} interleaved rounds;"
        f" QPS with {CONCURRENCY} concurrent callers"
    )
    print(f"  {'ef_search':>9} {'path':<6} {'recall@10':>9} {'p50 ms':>8} {'p95 ms':>8} {'QPS':>8}")
    for ef in EF_SEARCH:
        for conn in connections:  # a session setting, as the service keeps it per connection
            await conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
        per_path: dict[str, dict[str, list[float]]] = {
            p: {"p50": [], "p95": [], "qps": [], "recall": []} for p in ("grpc", "sql")
        }
        for _ in range(rounds):
            for path in ("grpc", "sql"):
                calls = [
                    via_grpc(v, ef) if path == "grpc" else via_sql(v, connections[0])
                    for v in query_vectors
                ]
                latencies, results = await timed(calls)
                concurrent = [
                    via_grpc(v, ef) if path == "grpc" else via_sql(v, connections[i % CONCURRENCY])
                    for i, v in enumerate(query_vectors)
                ]
                rate = await qps(concurrent)
                stats = per_path[path]
                stats["p50"].append(statistics.median(latencies))
                stats["p95"].append(float(np.percentile(latencies, 95)))
                stats["qps"].append(rate)
                stats["recall"].append(recall(results, truth))
        for path, stats in per_path.items():
            print(
                f"  {ef:>9} {path:<6} {statistics.median(stats['recall']):>9.3f} "
                f"{statistics.median(stats['p50']):>8.2f} {statistics.median(stats['p95']):>8.2f} "
                f"{statistics.median(stats['qps']):>8.0f}"
            )
        ratio = statistics.median(per_path["grpc"]["p50"]) / statistics.median(
            per_path["sql"]["p50"]
        )
        print(f"  {'':>9} gRPC p50 / raw SQL p50: {ratio:.2f}x   (goal <= 1.5x, recall >= 0.95)")
    for conn in connections:
        await conn.close()


async def qps(calls: list[Callable[[], Awaitable[list[int]]]]) -> float:
    """Calls per second from CONCURRENCY callers, each making its share one at a time (a
    raw SQL caller owns one connection, which runs one query at a time)."""
    lanes = [calls[i::CONCURRENCY] for i in range(CONCURRENCY)]

    async def lane(own: list[Callable[[], Awaitable[list[int]]]]) -> None:
        for call in own:
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(lane(own) for own in lanes))
    return len(calls) / (time.perf_counter() - started)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.vectors, args.queries, args.rounds))
