"""Typed async client for daert.v1.EmbeddingService."""

from __future__ import annotations

from collections.abc import Sequence

from daert.clients.base import ServiceClient
from daert.v1 import embedding_pb2, embedding_pb2_grpc

# Inputs per Embed call: well under the service's per-request limit (256).
EMBED_BATCH = 128


class EmbeddingClient(ServiceClient):
    service, full_name = "embedding", "daert.v1.EmbeddingService"
    stub_class = embedding_pb2_grpc.EmbeddingServiceStub
    stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub

    async def embed_texts(
        self,
        texts: Sequence[str],
        *,
        model: str = "",
        input_type: embedding_pb2.InputType.ValueType = embedding_pb2.INPUT_TYPE_DOCUMENT,
        dimensions: int = 0,
        timeout_s: float | None = None,
    ) -> list[list[float]]:
        """The common case: normalised vectors for `texts` (any number: sent in batches the
        service takes), as plain lists."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), EMBED_BATCH):
            response = await self.stub.Embed(
                embedding_pb2.EmbedRequest(
                    inputs=texts[start : start + EMBED_BATCH],
                    model=model,
                    input_type=input_type,
                    dimensions=dimensions,
                ),
                timeout=timeout_s,
            )
            vectors += [list(v.values) for v in response.embeddings]
        return vectors
