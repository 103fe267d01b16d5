"""The protocol every rerank backend implements, and the micro-batcher in-process ones share."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from daert.rerank.config import ModelConfig, RerankSettings
from daert.runtime.batching import MicroBatcher


@dataclass(frozen=True)
class ModelInfo:
    max_input_tokens: int  # 0 when the backend does not say


@dataclass(frozen=True)
class Scored:
    scores: list[float]  # one per document, in request order, each in [0, 1]
    tokens: int | None  # tokens the model read for the whole call, None when unknown


class RerankBackend(Protocol):
    kind: str  # as reported by ListModels: "embedded", "cross-encoder", "tei"

    @property
    def info(self) -> ModelInfo | None:
        """Limits, once known (after `start` or a successful `ready`)."""
        ...

    async def start(self) -> None:
        """Load an in-process model (errors are fatal). Remote backends connect lazily."""
        ...

    async def ready(self) -> bool:
        """Whether the backend answers now; remote backends learn `info` on first success."""
        ...

    async def score(self, query: str, documents: list[str]) -> Scored:
        """Relevance of each document to the query. Over-long pairs are truncated."""
        ...

    async def close(self) -> None: ...


T = TypeVar("T")
R = TypeVar("R")


def model_batcher(
    config: ModelConfig,
    settings: RerankSettings,
    run_batch: Callable[[None, list[T]], Coroutine[Any, Any, Sequence[R]]],
) -> MicroBatcher[None, T, R]:
    """The micro-batcher of an in-process model: items of concurrent calls share forward
    passes (one key: every item may share a batch with every other)."""
    return MicroBatcher(
        f"rerank:{config.name}",
        run_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        max_queued=settings.max_queued_items,
    )
