"""The retrieval contract, run unchanged against both backends: a real retrieval server
in front of a real PostgreSQL + pgvector, and in front of a real Weaviate."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from daert.clients import field_violations
from daert.clients.services import RetrievalClient
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess
from daert.v1 import common_pb2, retrieval_pb2
from google.protobuf import struct_pb2

VECTOR = retrieval_pb2.SEARCH_MODE_VECTOR
KEYWORD = retrieval_pb2.SEARCH_MODE_KEYWORD
HYBRID = retrieval_pb2.SEARCH_MODE_HYBRID


@dataclass
class Store:
    backend: str
    server: ServerProcess
    atomic_replace: bool


@pytest.fixture(scope="module", params=["pgvector", "weaviate"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    if request.param == "pgvector":
        postgres: EmbeddedPostgres = request.getfixturevalue("postgres")
        env = {"DAERT_RETRIEVAL_DSN": postgres.dsn}
        with ServerProcess("retrieval", env) as server:
            server.wait_health("SERVING")
            yield Store("pgvector", server, atomic_replace=True)
        return
    from daert.local.weaviate import EmbeddedWeaviate

    weaviate = EmbeddedWeaviate(tmp_path_factory.mktemp("weaviate"))
    url, grpc_port = weaviate.start()
    env = {
        "DAERT_RETRIEVAL_BACKEND": "weaviate",
        "DAERT_RETRIEVAL_WEAVIATE_URL": url,
        "DAERT_RETRIEVAL_WEAVIATE_GRPC_PORT": str(grpc_port),
    }
    try:
        with ServerProcess("retrieval", env) as server:
            server.wait_health("SERVING")
            yield Store("weaviate", server, atomic_replace=False)
    finally:
        weaviate.stop()


@pytest.fixture
async def client(store: Store) -> AsyncIterator[RetrievalClient]:
    async with RetrievalClient(store.server.target) as client:
        yield client


# --- helpers ---------------------------------------------------------------------------------


def unique(prefix: str = "c") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def vec(*values: float) -> common_pb2.Vector:
    return common_pb2.Vector(values=values)


def chunk(
    id: str, text: str, vector: list[float] | tuple[float, ...], document_id: str = "", **meta: Any
) -> retrieval_pb2.Chunk:
    return retrieval_pb2.Chunk(
        id=id, document_id=document_id, text=text, vector=vec(*vector), metadata=struct(meta)
    )


async def create(
    client: RetrievalClient,
    dimensions: int = 3,
    tenant: str = "",
    metric: int = retrieval_pb2.DISTANCE_METRIC_COSINE,
    name: str | None = None,
) -> str:
    name = name or unique()
    await client.stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(
            collection=name, tenant=tenant, dimensions=dimensions, metric=metric
        )
    )
    return name


async def search(client: RetrievalClient, collection: str, **fields: Any) -> list[str]:
    reply = await client.stub.Search(retrieval_pb2.SearchRequest(collection=collection, **fields))
    return [hit.chunk.id for hit in reply.hits]


async def status_of(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    return error.code(), error.details() or "", list(field_violations(error))


# --- collections -----------------------------------------------------------------------------


async def test_collection_lifecycle(client: RetrievalClient) -> None:
    name = unique()
    created = await client.stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(
            collection=name,
            dimensions=4,
            metric=retrieval_pb2.DISTANCE_METRIC_DOT,
            hnsw=retrieval_pb2.HnswParams(m=8, ef_construction=32),
        )
    )
    assert created.created
    assert created.collection.dimensions == 4
    assert created.collection.metric == retrieval_pb2.DISTANCE_METRIC_DOT
    assert (created.collection.hnsw.m, created.collection.hnsw.ef_construction) == (8, 32)

    again = await client.stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(
            collection=name,
            dimensions=4,
            metric=retrieval_pb2.DISTANCE_METRIC_DOT,
            hnsw=retrieval_pb2.HnswParams(m=8, ef_construction=32),
            if_not_exists=True,
        )
    )
    assert not again.created
    code, details, _ = await status_of(
        client.stub.CreateCollection(
            retrieval_pb2.CreateCollectionRequest(collection=name, dimensions=5)
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "different settings" in details

    listed = await client.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
    assert name in [c.name for c in listed.collections]
    names = [c.name for c in listed.collections]
    assert names == sorted(names)

    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                chunk("a", "alpha", (1, 0, 0, 0), "doc1"),
                chunk("b", "beta", (0, 1, 0, 0), "doc1"),
                chunk("c", "gamma", (0, 0, 1, 0), "doc2"),
            ],
        )
    )
    got = await client.stub.GetCollection(retrieval_pb2.GetCollectionRequest(collection=name))
    assert (got.collection.chunk_count, got.collection.document_count) == (3, 2)

    deleted = await client.stub.DeleteCollection(
        retrieval_pb2.DeleteCollectionRequest(collection=name)
    )
    assert deleted.deleted and deleted.chunks_deleted == 3
    code, _, _ = await status_of(
        client.stub.GetCollection(retrieval_pb2.GetCollectionRequest(collection=name))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = await status_of(
        client.stub.DeleteCollection(retrieval_pb2.DeleteCollectionRequest(collection=name))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    missing = await client.stub.DeleteCollection(
        retrieval_pb2.DeleteCollectionRequest(collection=name, allow_missing=True)
    )
    assert not missing.deleted


# --- writes ----------------------------------------------------------------------------------


async def test_upsert_is_idempotent_and_replaces_changed_chunks(client: RetrievalClient) -> None:
    name = await create(client)
    chunks = [
        chunk("a", "alpha", (1, 0, 0), "d", year=2020, tags=["x", "y"]),
        chunk("b", "beta", (0, 1, 0), "d", nested={"k": "v", "n": 1}),
        chunk("c", "gamma", (0, 0, 1)),
    ]
    first = await client.stub.Upsert(retrieval_pb2.UpsertRequest(collection=name, chunks=chunks))
    assert (first.upserted, first.unchanged) == (3, 0)
    stored = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=name, ids=["a", "b", "c"], include_vectors=True)
    )

    second = await client.stub.Upsert(retrieval_pb2.UpsertRequest(collection=name, chunks=chunks))
    assert (second.upserted, second.unchanged) == (0, 3)
    assert (
        await client.stub.Get(
            retrieval_pb2.GetRequest(collection=name, ids=["a", "b", "c"], include_vectors=True)
        )
        == stored
    )

    # The same metadata with its keys in another order is the same chunk.
    reordered = chunk("b", "beta", (0, 1, 0), "d", nested={"n": 1, "k": "v"})
    changed = chunk("a", "alpha, revised", (1, 0, 0), "d", year=2020, tags=["x", "y"])
    moved = chunk("c", "gamma", (0, 0.5, 1))
    third = await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(collection=name, chunks=[reordered, changed, moved])
    )
    assert (third.upserted, third.unchanged) == (2, 1)
    got = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=name, ids=["a", "c"], include_vectors=True)
    )
    assert got.chunks[0].text == "alpha, revised"
    assert list(got.chunks[0].metadata["tags"]) == ["x", "y"]
    assert list(got.chunks[1].vector.values) == [0, 0.5, 1]
    info = await client.stub.GetCollection(retrieval_pb2.GetCollectionRequest(collection=name))
    assert info.collection.chunk_count == 3


async def test_get_orders_ids_then_documents_and_reports_missing(
    client: RetrievalClient,
) -> None:
    name = await create(client)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                chunk("a1", "one", (1, 0, 0), "A"),
                chunk("a2", "two", (0, 1, 0), "A"),
                chunk("b1", "three", (0, 0, 1), "B"),
            ],
        )
    )
    got = await client.stub.Get(
        retrieval_pb2.GetRequest(
            collection=name, ids=["b1", "nope", "a2"], document_ids=["A", "missing-doc"]
        )
    )
    assert [c.id for c in got.chunks] == ["b1", "a2", "a1"]
    assert list(got.missing_ids) == ["nope"]
    assert not got.chunks[0].HasField("vector")


async def test_replace_document_swaps_its_chunks(client: RetrievalClient) -> None:
    name = await create(client)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[chunk(f"d-{i}", f"old {i}", (1, i, 0), "d") for i in range(3)]
            + [chunk("other", "another document", (0, 0, 1), "e")],
        )
    )
    reply = await client.stub.ReplaceDocument(
        retrieval_pb2.ReplaceDocumentRequest(
            collection=name,
            document_id="d",
            chunks=[chunk("d-0", "old 0", (1, 0, 0)), chunk("d-9", "new", (0, 1, 1))],
        )
    )
    assert (reply.upserted, reply.unchanged, reply.deleted) == (1, 1, 2)
    got = await client.stub.Get(retrieval_pb2.GetRequest(collection=name, document_ids=["d", "e"]))
    assert [c.id for c in got.chunks] == ["d-0", "d-9", "other"]
    assert {c.document_id for c in got.chunks[:2]} == {"d"}

    emptied = await client.stub.ReplaceDocument(
        retrieval_pb2.ReplaceDocumentRequest(collection=name, document_id="d")
    )
    assert emptied.deleted == 2
    code, _, fields = await status_of(
        client.stub.ReplaceDocument(
            retrieval_pb2.ReplaceDocumentRequest(
                collection=name, document_id="d", chunks=[chunk("x", "x", (1, 0, 0), "zzz")]
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["chunks[0].document_id"]


async def test_replace_document_is_atomic_for_readers(
    client: RetrievalClient, store: Store
) -> None:
    if not store.atomic_replace:
        pytest.skip(
            f"{store.backend} has no transactions: ReplaceDocument is documented as "
            "briefly showing old and new chunks together"
        )
    name = await create(client)
    versions = {
        "v1": [chunk(f"p{i}", f"v1 part {i}", (1, i, 1)) for i in range(6)],
        "v2": [chunk(f"q{i}", f"v2 part {i}", (i, 1, 1)) for i in range(4)],
    }
    expected = {frozenset(c.id for c in chunks) for chunks in versions.values()}
    await client.stub.ReplaceDocument(
        retrieval_pb2.ReplaceDocumentRequest(
            collection=name, document_id="doc", chunks=versions["v1"]
        )
    )
    done = asyncio.Event()
    seen: list[frozenset[str]] = []

    async def read() -> None:
        while not done.is_set():
            got = await client.stub.Get(
                retrieval_pb2.GetRequest(collection=name, document_ids=["doc"])
            )
            seen.append(frozenset(c.id for c in got.chunks))

    readers = [asyncio.create_task(read()) for _ in range(3)]
    for round_ in range(20):
        await client.stub.ReplaceDocument(
            retrieval_pb2.ReplaceDocumentRequest(
                collection=name, document_id="doc", chunks=versions["v2" if round_ % 2 else "v1"]
            )
        )
    done.set()
    await asyncio.gather(*readers)
    assert len(seen) > 20
    assert set(seen) <= expected, "a reader saw old and new chunks mixed"


async def test_delete_by_ids_documents_and_filter(client: RetrievalClient) -> None:
    name = await create(client)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                chunk("a", "a", (1, 0, 0), "D1", kind="draft"),
                chunk("b", "b", (0, 1, 0), "D1", kind="final"),
                chunk("c", "c", (0, 0, 1), "D2", kind="draft"),
                chunk("d", "d", (1, 1, 0), "D3", kind="final"),
            ],
        )
    )
    by_ids = await client.stub.Delete(
        retrieval_pb2.DeleteRequest(collection=name, ids=["a", "not-there"])
    )
    assert by_ids.deleted == 1
    by_doc = await client.stub.Delete(
        retrieval_pb2.DeleteRequest(collection=name, document_ids=["D1"])
    )
    assert by_doc.deleted == 1
    by_filter = await client.stub.Delete(
        retrieval_pb2.DeleteRequest(collection=name, filter=struct({"kind": "draft"}))
    )
    assert by_filter.deleted == 1
    left = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=name, ids=["a", "b", "c", "d"])
    )
    assert [c.id for c in left.chunks] == ["d"]

    for request, field in [
        (retrieval_pb2.DeleteRequest(collection=name, filter=struct({})), "filter"),
        (retrieval_pb2.DeleteRequest(collection=name), "ids"),
        (retrieval_pb2.DeleteRequest(collection=name, ids=["d"], document_ids=["D3"]), "ids"),
    ]:
        code, _, fields = await status_of(client.stub.Delete(request))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


# --- documents -------------------------------------------------------------------------------

# Document id -> its chunks' (id, kind). "Zeta" sorts before "alpha" (code point order), and
# "b" has its chunks out of id order, so the smallest id is not the first written.
DOCUMENTS = {
    "b": [("b#2", "final"), ("b#0", "draft"), ("b#1", "final")],
    "alpha": [("alpha#0", "final")],
    "Zeta": [("z#0", "draft"), ("z#1", "draft")],
    "c": [("c#0", "final")],
    "d\u00e9j\u00e0": [("dj#0", "draft")],
}


def documents(reply: retrieval_pb2.ListDocumentsResponse) -> list[tuple[str, int, str]]:
    """(document id, chunk count, the listed chunk's `part`) for each listed document."""
    return [(d.document_id, d.chunk_count, str(d.metadata["part"])) for d in reply.documents]


@pytest.fixture(scope="module")
async def documents_collection(store: Store) -> AsyncIterator[str]:
    async with RetrievalClient(store.server.target) as client:
        name = await create(client)
        chunks = [
            chunk(id, f"text of {id}", (1, n, 1), document_id, part=id, kind=kind, hash=document_id)
            for n, (document_id, parts) in enumerate(DOCUMENTS.items())
            for id, kind in parts
        ]
        alone = chunk("alone", "a stand-alone chunk", (0, 1, 1), part="alone", kind="draft")
        await client.stub.Upsert(
            retrieval_pb2.UpsertRequest(collection=name, chunks=[*chunks, alone])
        )
        yield name


async def test_list_documents_counts_and_sorts(
    client: RetrievalClient, documents_collection: str
) -> None:
    reply = await client.stub.ListDocuments(
        retrieval_pb2.ListDocumentsRequest(collection=documents_collection)
    )
    # Sorted by id; the stand-alone chunk (empty document id) is not a document.
    assert documents(reply) == [
        ("Zeta", 2, "z#0"),
        ("alpha", 1, "alpha#0"),
        ("b", 3, "b#0"),
        ("c", 1, "c#0"),
        ("d\u00e9j\u00e0", 1, "dj#0"),
    ]
    assert reply.next_page_token == ""
    assert dict(reply.documents[2].metadata) == {"part": "b#0", "kind": "draft", "hash": "b"}


async def test_list_documents_pages_return_every_document_once(
    client: RetrievalClient, documents_collection: str
) -> None:
    listed: list[str] = []
    token = ""
    for _ in range(len(DOCUMENTS)):
        reply = await client.stub.ListDocuments(
            retrieval_pb2.ListDocumentsRequest(
                collection=documents_collection, page_size=2, page_token=token
            )
        )
        assert len(reply.documents) <= 2
        listed += [d.document_id for d in reply.documents]
        token = reply.next_page_token
        if not token:
            break
    assert token == ""
    assert listed == sorted(DOCUMENTS)  # three pages: 2, 2 and 1


async def test_list_documents_by_ids_and_filter(
    client: RetrievalClient, documents_collection: str
) -> None:
    async def listed(**fields: Any) -> list[tuple[str, int, str]]:
        request = retrieval_pb2.ListDocumentsRequest(collection=documents_collection, **fields)
        return documents(await client.stub.ListDocuments(request))

    by_ids = await listed(document_ids=["c", "missing", "b", "", "c"])
    assert by_ids == [("b", 3, "b#0"), ("c", 1, "c#0")]
    # Only the matching chunks count, and the listed metadata is theirs.
    assert await listed(filter=struct({"kind": "final"})) == [
        ("alpha", 1, "alpha#0"),
        ("b", 2, "b#1"),
        ("c", 1, "c#0"),
    ]
    assert await listed(filter=struct({"kind": "final"}), document_ids=["Zeta", "b"]) == [
        ("b", 2, "b#1")
    ]
    assert await listed(filter=struct({"no_such_key": "x"})) == []
    assert len(await listed(filter=struct({}))) == len(DOCUMENTS)  # empty: every chunk
    code, _, fields = await status_of(
        client.stub.ListDocuments(
            retrieval_pb2.ListDocumentsRequest(
                collection=documents_collection, filter=struct({"kind": {"like": "x"}})
            )
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["filter.kind.like"])


# --- search ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "score"),
    [
        (
            retrieval_pb2.DISTANCE_METRIC_COSINE,
            lambda q, v: float(q @ v / np.linalg.norm(q) / np.linalg.norm(v)),
        ),
        (retrieval_pb2.DISTANCE_METRIC_DOT, lambda q, v: float(q @ v)),
        (retrieval_pb2.DISTANCE_METRIC_L2, lambda q, v: -float(np.linalg.norm(q - v))),
    ],
    ids=["cosine", "dot", "l2"],
)
async def test_vector_search_ranks_and_scores_by_the_metric(
    client: RetrievalClient, metric: int, score: Any
) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    name = await create(client, dimensions=8, metric=metric)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[chunk(f"v{i}", f"text {i}", tuple(v)) for i, v in enumerate(vectors)],
        )
    )
    query = rng.normal(size=8).astype(np.float32)
    exact = sorted(range(40), key=lambda i: -score(query, vectors[i]))[:5]
    reply = await client.stub.Search(
        retrieval_pb2.SearchRequest(collection=name, query_vector=vec(*query), top_k=5)
    )
    assert reply.mode == VECTOR
    assert [hit.chunk.id for hit in reply.hits] == [f"v{i}" for i in exact]
    for hit, i in zip(reply.hits, exact, strict=True):
        assert math.isclose(hit.score, score(query, vectors[i]), rel_tol=1e-3, abs_tol=1e-4)
        assert hit.vector_rank == exact.index(i) + 1 and not hit.HasField("keyword_rank")


async def test_keyword_search_finds_terms(client: RetrievalClient) -> None:
    name = await create(client)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                chunk("refund", "Refunds for damaged parcels are paid within 14 days.", (1, 0, 0)),
                chunk("ship", "Parcels ship from our Leipzig warehouse.", (0, 1, 0)),
                chunk("other", "The cafeteria opens at eight.", (0, 0, 1)),
            ],
        )
    )
    reply = await client.stub.Search(
        retrieval_pb2.SearchRequest(collection=name, query_text="damaged parcels refund")
    )
    assert reply.mode == KEYWORD
    assert [hit.chunk.id for hit in reply.hits] == ["refund", "ship"]
    assert reply.hits[0].score > reply.hits[1].score > 0
    assert await search(client, name, query_text="zebra xylophone") == []


async def test_hybrid_beats_vector_on_a_keyword_heavy_query(
    client: RetrievalClient, reference_model: Any
) -> None:
    """An error code means nothing to an embedding model; the keyword ranking finds it."""
    texts = {
        "target": "E4512 means the ledger was locked overnight.",
        "billing-1": "Billing runs fail when the payment provider is unreachable.",
        "billing-2": "Troubleshooting failed billing runs: check credentials and retries.",
        "billing-3": "Payment failures during the billing run show up in the finance dashboard.",
        "billing-4": "When a billing job crashes, it is retried three times.",
        "ledger": "The accounts table keeps one row per bill and payment.",
        "unrelated": "Our office plants are watered every Tuesday.",
    }
    vectors = reference_model.encode(list(texts.values()), normalize_embeddings=True)
    name = await create(client, dimensions=vectors.shape[1])
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            chunks=[
                chunk(i, t, tuple(v)) for (i, t), v in zip(texts.items(), vectors, strict=True)
            ],
        )
    )
    query = "invoicing problem E4512"
    query_vector = vec(*reference_model.encode(query, normalize_embeddings=True))
    vector_only = await search(client, name, query_vector=query_vector, mode=VECTOR, top_k=7)
    hybrid = await client.stub.Search(
        retrieval_pb2.SearchRequest(
            collection=name, query_vector=query_vector, query_text=query, top_k=7
        )
    )
    assert hybrid.mode == HYBRID
    assert vector_only[0] != "target"
    assert hybrid.hits[0].chunk.id == "target"
    assert hybrid.hits[0].HasField("vector_rank") and hybrid.hits[0].keyword_rank == 1
    weighted = await search(
        client, name, query_vector=query_vector, query_text=query, vector_weight=1.0, top_k=7
    )
    assert weighted == vector_only  # all weight on the vector ranking reproduces it
    relative = await search(
        client,
        name,
        query_vector=query_vector,
        query_text=query,
        fusion=retrieval_pb2.HYBRID_FUSION_RELATIVE_SCORE,
    )
    assert relative[0] == "target"


FILTER_FIXTURE = {
    "a": {
        "year": 2019,
        "lang": "en",
        "tags": ["ml", "nlp"],
        "date": "2024-01-05",
        "author": {"name": "Ada"},
        "draft": True,
    },
    "b": {
        "year": 2021,
        "lang": "de",
        "tags": ["ml"],
        "date": "2024-03-01",
        "author": {"name": "Grace"},
        "draft": False,
    },
    "c": {"year": 2023, "lang": "en", "tags": ["db"], "date": "2024-07-30"},
    "d": {"year": 2024.5, "lang": "fr", "reviewed": None},
}

FILTER_CASES = [
    ({"lang": "en"}, {"a", "c"}),
    ({"lang": {"eq": "de"}}, {"b"}),
    ({"tags": "ml"}, {"a", "b"}),
    ({"tags": {"in": ["db", "nlp"]}}, {"a", "c"}),
    ({"lang": {"ne": "en"}}, {"b", "d"}),
    ({"tags": {"ne": "ml"}}, {"c", "d"}),  # ne is true where the key is missing
    ({"lang": {"in": ["fr", "de"]}}, {"b", "d"}),
    ({"year": {"range": {"gte": 2021}}}, {"b", "c", "d"}),
    ({"year": {"range": {"gt": 2019, "lt": 2024}}}, {"b", "c"}),
    ({"year": {"range": {"lte": 2024.5, "gt": 2023}}}, {"d"}),
    ({"date": {"range": {"gte": "2024-02-01", "lt": "2024-12-31"}}}, {"b", "c"}),
    ({"author.name": "Grace"}, {"b"}),
    ({"author.name": {"exists": True}}, {"a", "b"}),
    ({"author.name": {"exists": False}}, {"c", "d"}),
    ({"draft": True}, {"a"}),
    ({"draft": False}, {"b"}),
    ({"lang": "en", "year": {"range": {"gt": 2020}}}, {"c"}),
    ({"or": [{"lang": "de"}, {"year": {"range": {"gt": 2023}}}]}, {"b", "d"}),
    ({"and": [{"tags": "ml"}, {"not": {"lang": "de"}}]}, {"a"}),
    ({"not": {"or": [{"lang": "en"}, {"lang": "de"}]}}, {"d"}),
    ({"no_such_key": "x"}, set()),
    ({"no_such_key": {"exists": False}}, {"a", "b", "c", "d"}),
    # Attempts to break out of a parameter: they are data, so they just match nothing.
    ({"lang') OR 1=1 --": "x"}, set()),
    ({"lang": "en' OR '1'='1"}, set()),
    ({'x"}}': {"exists": True}}, set()),
    ({"lang": {"in": ["'; DROP TABLE daert_collections; --", "fr"]}}, {"d"}),
    ({"year": {"range": {"gte": "1) OR (1=1"}}}, set()),
]


@pytest.fixture(scope="module")
async def filter_collection(store: Store) -> AsyncIterator[str]:
    async with RetrievalClient(store.server.target) as client:
        name = await create(client)
        await client.stub.Upsert(
            retrieval_pb2.UpsertRequest(
                collection=name,
                chunks=[
                    chunk(i, f"chunk {i}", (1, n, 1), **meta)
                    for n, (i, meta) in enumerate(FILTER_FIXTURE.items())
                ],
            )
        )
        yield name


@pytest.mark.parametrize(("where", "expected"), FILTER_CASES, ids=[str(c[0]) for c in FILTER_CASES])
async def test_filters(
    client: RetrievalClient, filter_collection: str, where: dict[str, Any], expected: set[str]
) -> None:
    found = await search(
        client, filter_collection, query_vector=vec(1, 1, 1), top_k=10, filter=struct(where)
    )
    assert set(found) == expected
    keyword = await search(
        client, filter_collection, query_text="chunk", top_k=10, filter=struct(where)
    )
    assert set(keyword) == expected
    listed = await client.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
    assert filter_collection in [c.name for c in listed.collections]


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ({"year": {"between": [1, 2]}}, "filter.year.between"),
        ({"and": []}, "filter.and"),
        (
            {"and": [{"a": 1}, {"year": {"range": {"gte": 1, "lt": "x"}}}]},
            "filter.and[1].year.range",
        ),
        ({"a": None}, "filter.a"),
        ({"a": {"in": "x"}}, "filter.a.in"),
        ({"a": {"range": {"over": 1}}}, "filter.a.range.over"),
        ({"a": {"range": {"gt": True}}}, "filter.a.range.gt"),
        ({"not": 5}, "filter.not"),
        ({"a": {}}, "filter.a"),
        ({"a..b": 1}, "filter.a..b"),
        ({"a": {"exists": "yes"}}, "filter.a.exists"),
        ({"or": [{"a": {"in": [1, {"x": 1}]}}]}, "filter.or[0].a.in[1]"),
    ],
)
async def test_malformed_filters_name_their_path(
    client: RetrievalClient, filter_collection: str, where: dict[str, Any], field: str
) -> None:
    code, _, fields = await status_of(
        client.stub.Search(
            retrieval_pb2.SearchRequest(
                collection=filter_collection, query_vector=vec(1, 1, 1), filter=struct(where)
            )
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def small_collection(store: Store) -> AsyncIterator[str]:
    async with RetrievalClient(store.server.target) as client:
        yield await create(client)


def _bad_requests(name: str) -> list[tuple[str, Any, grpc.StatusCode, str]]:
    ok = chunk("ok", "fine", (1, 0, 0))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("Upsert", retrieval_pb2.UpsertRequest(collection=name), invalid, "chunks"),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection=name, chunks=[chunk("x", "t", (1, 0))]),
            invalid,
            "chunks[0].vector",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(
                collection=name, chunks=[ok, chunk("y", "t", (1, math.nan, 0))]
            ),
            invalid,
            "chunks[1].vector",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(
                collection=name, chunks=[chunk("y", "t", (1, math.inf, 0))]
            ),
            invalid,
            "chunks[0].vector",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection=name, chunks=[chunk("z", "t", (0, 0, 0))]),
            invalid,
            "chunks[0].vector",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection=name, chunks=[ok, ok]),
            invalid,
            "chunks[1].id",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(
                collection=name, chunks=[retrieval_pb2.Chunk(id="v", text="no vector")]
            ),
            invalid,
            "chunks[0].vector",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection=name, chunks=[chunk("", "t", (1, 0, 0))]),
            invalid,
            "chunks[0].id",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(
                collection=name, chunks=[chunk("m", "t", (1, 0, 0), score=math.nan)]
            ),
            invalid,
            "chunks[0].metadata",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection="no_such_collection", chunks=[ok]),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection="Bad-Name", chunks=[ok]),
            invalid,
            "collection",
        ),
        (
            "Upsert",
            retrieval_pb2.UpsertRequest(collection=name, tenant="bad tenant!", chunks=[ok]),
            invalid,
            "tenant",
        ),
        ("Search", retrieval_pb2.SearchRequest(collection=name), invalid, "query_vector"),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_vector=vec(1, 0)),
            invalid,
            "query_vector",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_vector=vec(1, math.inf, 0)),
            invalid,
            "query_vector",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_text="x", top_k=-1),
            invalid,
            "top_k",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_text="x", top_k=1001),
            invalid,
            "top_k",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_text="   ", mode=KEYWORD),
            invalid,
            "query_text",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_vector=vec(1, 0, 0), mode=HYBRID),
            invalid,
            "query_text",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_text="x", mode=VECTOR),
            invalid,
            "query_vector",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(
                collection=name, query_vector=vec(1, 0, 0), query_text="x", vector_weight=1.5
            ),
            invalid,
            "vector_weight",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(
                collection=name, query_vector=vec(1, 0, 0), ef_search=100_000
            ),
            invalid,
            "ef_search",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection=name, query_text="x", mode=9),
            invalid,
            "mode",
        ),
        (
            "Search",
            retrieval_pb2.SearchRequest(collection="missing_one", query_text="x"),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        ("Get", retrieval_pb2.GetRequest(collection=name), invalid, "ids"),
        (
            "ListDocuments",
            retrieval_pb2.ListDocumentsRequest(collection=name, page_size=-1),
            invalid,
            "page_size",
        ),
        (
            "ListDocuments",
            retrieval_pb2.ListDocumentsRequest(collection=name, page_size=1001),
            invalid,
            "page_size",
        ),
        *(
            (
                "ListDocuments",
                retrieval_pb2.ListDocumentsRequest(collection=name, page_token=token),
                invalid,
                "page_token",
            )
            # Not base64; not UTF-8; a NUL; "a" spelt unlike this service spells it ("YQ==").
            for token in ("not a token!", "_w==", "AA==", "YR==")
        ),
        (
            "ListDocuments",
            retrieval_pb2.ListDocumentsRequest(collection="missing_one"),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            "CreateCollection",
            retrieval_pb2.CreateCollectionRequest(collection=unique()),
            invalid,
            "dimensions",
        ),
        (
            "CreateCollection",
            retrieval_pb2.CreateCollectionRequest(collection=unique(), dimensions=3, metric=7),
            invalid,
            "metric",
        ),
        (
            "CreateCollection",
            retrieval_pb2.CreateCollectionRequest(
                collection=unique(), dimensions=3, hnsw=retrieval_pb2.HnswParams(m=500)
            ),
            invalid,
            "hnsw.m",
        ),
        (
            "CreateCollection",
            retrieval_pb2.CreateCollectionRequest(
                collection=unique(),
                dimensions=3,
                hnsw=retrieval_pb2.HnswParams(m=16, ef_construction=8),
            ),
            invalid,
            "hnsw.ef_construction",
        ),
        (
            "CreateCollection",
            retrieval_pb2.CreateCollectionRequest(collection="1starts_with_digit", dimensions=3),
            invalid,
            "collection",
        ),
        (
            "ReplaceDocument",
            retrieval_pb2.ReplaceDocumentRequest(collection=name),
            invalid,
            "document_id",
        ),
    ]


async def test_bad_input_is_rejected_naming_the_field(
    client: RetrievalClient, small_collection: str, store: Store
) -> None:
    for method, request, expected_code, field in _bad_requests(small_collection):
        code, details, fields = await status_of(getattr(client.stub, method)(request))
        assert code == expected_code, (method, request, details)
        assert fields == ([field] if field else []), (method, request, details)
        if field:
            assert details.startswith(field), details
    assert store.server.health() == "SERVING"
    nothing = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=small_collection, ids=["ok", "x", "y", "z", "m"])
    )
    assert list(nothing.chunks) == []  # a rejected request writes nothing


# --- tenants ---------------------------------------------------------------------------------


async def test_tenants_are_isolated(client: RetrievalClient) -> None:
    name = unique("shared")
    for tenant in ("acme", "globex"):
        await create(client, tenant=tenant, name=name)
    await client.stub.Upsert(
        retrieval_pb2.UpsertRequest(
            collection=name,
            tenant="acme",
            chunks=[chunk("secret", "acme quarterly numbers", (1, 0, 0), "plan", team="a")],
        )
    )
    only_acme = await create(client, tenant="acme")

    b = "globex"
    assert await search(client, name, tenant=b, query_vector=vec(1, 0, 0)) == []
    assert await search(client, name, tenant=b, query_text="acme quarterly") == []
    got = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=name, tenant=b, ids=["secret"], document_ids=["plan"])
    )
    assert list(got.chunks) == [] and list(got.missing_ids) == ["secret"]
    for tenant, expected in (("acme", ["plan"]), (b, [])):
        reply = await client.stub.ListDocuments(
            retrieval_pb2.ListDocumentsRequest(collection=name, tenant=tenant)
        )
        assert [d.document_id for d in reply.documents] == expected
    for request in (
        retrieval_pb2.DeleteRequest(collection=name, tenant=b, ids=["secret"]),
        retrieval_pb2.DeleteRequest(collection=name, tenant=b, document_ids=["plan"]),
        retrieval_pb2.DeleteRequest(collection=name, tenant=b, filter=struct({"team": "a"})),
    ):
        assert (await client.stub.Delete(request)).deleted == 0
    listed = await client.stub.ListCollections(retrieval_pb2.ListCollectionsRequest(tenant=b))
    assert only_acme not in [c.name for c in listed.collections]
    for call in (
        client.stub.Search(
            retrieval_pb2.SearchRequest(collection=only_acme, tenant=b, query_text="x")
        ),
        client.stub.GetCollection(
            retrieval_pb2.GetCollectionRequest(collection=only_acme, tenant=b)
        ),
        client.stub.ListDocuments(
            retrieval_pb2.ListDocumentsRequest(collection=only_acme, tenant=b)
        ),
        client.stub.DeleteCollection(
            retrieval_pb2.DeleteCollectionRequest(collection=only_acme, tenant=b)
        ),
    ):
        code, _, _ = await status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND
    # The default tenant is a tenant like any other: it has no collection of that name.
    code, _, _ = await status_of(
        client.stub.Search(retrieval_pb2.SearchRequest(collection=name, query_text="acme"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    still = await client.stub.Get(
        retrieval_pb2.GetRequest(collection=name, tenant="acme", ids=["secret"])
    )
    assert [c.id for c in still.chunks] == ["secret"]


async def test_grpcurl_lists_collections_through_reflection(
    grpcurl: Path, store: Store, small_collection: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(grpcurl),
        "-plaintext",
        "-d",
        "{}",
        store.server.target,
        "daert.v1.RetrievalService/ListCollections",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert small_collection in out.decode()
