"""A served model (its backend and readiness) and the ordering of scored documents."""

from __future__ import annotations

import numpy as np

from daert.rerank.backends import RerankBackend, create_backend
from daert.rerank.config import ModelConfig, RerankSettings


class ServedModel:
    def __init__(self, config: ModelConfig, settings: RerankSettings) -> None:
        self.config = config
        self.backend: RerankBackend = create_backend(config, settings)
        self.ready = False  # as of the last readiness check

    async def start(self) -> None:
        await self.backend.start()

    async def check_ready(self) -> bool:
        self.ready = await self.backend.ready()
        return self.ready

    async def close(self) -> None:
        await self.backend.close()


def ranked(scores: list[float], top_n: int) -> list[tuple[int, float]]:
    """(index, score) best first, ties in request order, the first `top_n` (0: all).

    Scores are rounded to float32 first, as the response carries them: two scores that a
    client sees as equal are then ordered by index, never by a difference it cannot see.
    """
    wire = np.asarray(scores, dtype=np.float32).tolist()
    order = sorted(range(len(wire)), key=lambda i: (-wire[i], i))
    return [(i, wire[i]) for i in order[: top_n or None]]
