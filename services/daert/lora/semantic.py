"""Semantic ("auto") routing: cosine similarity between the request and each candidate
adapter's description and examples, embedded by the embedding service.

An adapter's score is its best match: the highest cosine between the request text and any
of its examples or its description. Both sides are embedded as queries (the examples are
requests too), so models with instruction prefixes compare like with like. Adapter vectors
are cached per adapter version (name, updated_at), so only new or replaced adapters cost an
embedding call; a route embeds just the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import grpc
import numpy as np
import numpy.typing as npt

from daert.clients import EmbeddingClient
from daert.lora.model import AdapterRecord
from daert.runtime.errors import downstream_error
from daert.v1 import embedding_pb2

Matrix = npt.NDArray[np.float32]


def adapter_texts(adapter: AdapterRecord) -> list[str]:
    """What an adapter is compared by: its examples and, when it has one, its description."""
    texts = list(adapter.spec.examples)
    if adapter.spec.description.strip():
        texts.append(adapter.spec.description)
    return texts


class SemanticMatcher:
    def __init__(self, model: str, timeout_s: float) -> None:
        self._client: EmbeddingClient | None = None  # made on first use, inside the loop
        self._model = model
        self._timeout_s = timeout_s
        # name -> (updated_at, unit vectors of its texts)
        self._vectors: dict[str, tuple[datetime, Matrix]] = {}
        self._lock = asyncio.Lock()  # concurrent first routes embed an adapter once

    async def best(
        self, query: str, candidates: Sequence[AdapterRecord]
    ) -> tuple[AdapterRecord, float]:
        """The candidate most similar to `query` (non-empty; candidates with examples or a
        description) and its score; ties go to the first candidate."""
        matrices = await self._adapter_vectors(candidates)
        (query_vector,) = await self._embed([query])
        scores = [float(np.max(matrix @ query_vector)) for matrix in matrices]
        index = int(np.argmax(scores))
        return candidates[index], scores[index]

    def forget(self, name: str) -> None:
        self._vectors.pop(name, None)

    async def _adapter_vectors(self, candidates: Sequence[AdapterRecord]) -> list[Matrix]:
        async with self._lock:
            stale = [a for a in candidates if self._vectors.get(a.name, (None,))[0] != a.updated_at]
            if stale:
                texts = [adapter_texts(a) for a in stale]
                vectors = await self._embed([t for group in texts for t in group])
                start = 0
                for adapter, group in zip(stale, texts, strict=True):
                    matrix = vectors[start : start + len(group)]
                    self._vectors[adapter.name] = (adapter.updated_at, matrix)
                    start += len(group)
            return [self._vectors[a.name][1] for a in candidates]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def _embed(self, texts: list[str]) -> Matrix:
        """Unit vectors for `texts`, as rows."""
        if self._client is None:
            # DAERT_EMBEDDING_TARGET names the service; one retry, as a route is waiting.
            self._client = EmbeddingClient(timeout_s=self._timeout_s, max_attempts=2)
        try:
            rows = await self._client.embed_texts(
                texts,
                model=self._model,
                input_type=embedding_pb2.INPUT_TYPE_QUERY,
                timeout_s=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(
                exc, '"auto" routing', self._client.service, self._client.target
            ) from None
        matrix = np.asarray(rows, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        unit: Matrix = matrix / np.maximum(norms, 1e-12)
        return unit
