"""A small corpus for two tenants, for the RAG tests of the gateway's pipeline and of the
gateway itself: upserted with the embedding service's vectors and the metadata keys the
ingestion pipeline writes (source_uri, title), plus a region to filter on."""

from __future__ import annotations

from daert.clients import EmbeddingClient, RetrievalClient
from daert.v1 import common_pb2, retrieval_pb2
from google.protobuf import struct_pb2

COLLECTION = "rag_handbook"
ACME_ONLY = "rag_acme_only"  # exists for acme only, and is empty
ACME, GLOBEX = "acme", "globex"
NIGHTJAR = "Globex's launch code for project Nightjar is amber-42, kept in the blue safe."

# tenant -> [(document id, title, region, [chunk texts])]
CORPUS: dict[str, list[tuple[str, str, str, list[str]]]] = {
    ACME: [
        (
            "manual",
            "Helix-9 maintenance manual",
            "us",
            [
                "The Helix-9 coolant pump must be inspected every 400 operating hours, "
                "and after any pressure alarm.",
                "Worn Helix-9 pump seals are replaced with the HX-77 seal kit; never reuse "
                "an old seal.",
                "The Helix-9 turbine is balanced once a year, when vibration exceeds 7 mm/s.",
            ],
        ),
        (
            "lisbon",
            "Lisbon office",
            "eu",
            ["The Lisbon office opens at 8:30 and closes at 17:00 on weekdays."],
        ),
        (
            "denver",
            "Denver office",
            "us",
            ["The Denver office opens at 9:00 and closes at 18:00 on weekdays."],
        ),
        (
            "cafeteria",
            "Cafeteria",
            "eu",
            ["The cafeteria serves vegetarian lasagna every Thursday at lunch."],
        ),
    ],
    GLOBEX: [
        ("nightjar", "Project Nightjar", "us", [NIGHTJAR]),
        (
            "globex-office",
            "Globex office",
            "us",
            ["The Globex office in Springfield opens at 7:00 on weekdays."],
        ),
    ],
}
GLOBEX_CHUNKS = {f"{d}-{i}" for d, _, _, texts in CORPUS[GLOBEX] for i in range(len(texts))}
# acme's chunk id -> (title, text)
ACME_CHUNKS = {
    f"{d}-{i}": (title, text) for d, title, _, texts in CORPUS[ACME] for i, text in enumerate(texts)
}


def source_uri(tenant: str, document: str) -> str:
    return f"file:///{tenant}/{document}.md"


async def load_corpus(embedding_target: str, retrieval_target: str) -> None:
    """(Re)create COLLECTION for both tenants with CORPUS, and an empty ACME_ONLY for acme."""
    async with (
        EmbeddingClient(embedding_target) as embedding,
        RetrievalClient(retrieval_target) as retrieval,
    ):
        [probe] = await embedding.embed_texts(["dimensions"])
        for tenant, documents in CORPUS.items():
            await _create(retrieval, tenant, COLLECTION, len(probe))
            for document, title, region, texts in documents:
                vectors = await embedding.embed_texts(texts)
                chunks = []
                for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                    metadata = struct_pb2.Struct()
                    metadata.update(
                        {
                            "source_uri": source_uri(tenant, document),
                            "title": title,
                            "region": region,
                            "position": i,
                        }
                    )
                    chunks.append(
                        retrieval_pb2.Chunk(
                            id=f"{document}-{i}",
                            document_id=document,
                            text=text,
                            vector=common_pb2.Vector(values=vector),
                            metadata=metadata,
                        )
                    )
                await retrieval.stub.Upsert(
                    retrieval_pb2.UpsertRequest(collection=COLLECTION, tenant=tenant, chunks=chunks)
                )
        await _create(retrieval, ACME, ACME_ONLY, len(probe))


async def _create(retrieval: RetrievalClient, tenant: str, collection: str, dims: int) -> None:
    await retrieval.stub.DeleteCollection(
        retrieval_pb2.DeleteCollectionRequest(
            collection=collection, tenant=tenant, allow_missing=True
        )
    )
    await retrieval.stub.CreateCollection(
        retrieval_pb2.CreateCollectionRequest(collection=collection, tenant=tenant, dimensions=dims)
    )
