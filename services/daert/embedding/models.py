"""A served model: its backend, its micro-batcher and the vector post-processing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from daert.embedding.backends import EmbeddingBackend, create_backend
from daert.embedding.config import EmbeddingSettings, ModelConfig
from daert.runtime.batching import MicroBatcher

# One text's result: its vector and the tokens the model read (0 when unknown).
Row = tuple[npt.NDArray[np.float32], int]


class ServedModel:
    def __init__(self, config: ModelConfig, settings: EmbeddingSettings) -> None:
        self.config = config
        self.backend: EmbeddingBackend = create_backend(config)
        # Keyed by the truncate flag: texts that may be cut never share an upstream call
        # with texts that must be rejected when too long.
        self.batcher: MicroBatcher[bool, str, Row] = MicroBatcher(
            f"embedding:{config.name}",
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queued=settings.max_queued_inputs,
        )
        self.ready = False  # as of the last readiness check

    async def _run_batch(self, truncate: bool, texts: list[str]) -> list[Row]:
        encoded = await self.backend.embed(texts, truncate)
        tokens = encoded.tokens or [0] * len(texts)
        return list(zip(encoded.vectors, tokens, strict=True))

    async def start(self) -> None:
        self.batcher.start()
        await self.backend.start()

    async def check_ready(self) -> bool:
        self.ready = await self.backend.ready()
        return self.ready

    async def close(self) -> None:
        await self.batcher.close()
        await self.backend.close()


def shape_vectors(
    vectors: npt.NDArray[np.float32], dimensions: int, normalize: bool
) -> npt.NDArray[np.float32]:
    """Matryoshka truncation to the first `dimensions` components (0 keeps all), then
    optional L2 normalisation (which re-normalises a truncated vector)."""
    if dimensions:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return vectors
