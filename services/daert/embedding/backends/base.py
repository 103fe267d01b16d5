"""The protocol every embedding backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ModelInfo:
    dimensions: int
    max_input_tokens: int  # 0 when the backend does not say


@dataclass(frozen=True)
class Encoded:
    vectors: npt.NDArray[np.float32]  # (len(texts), dimensions), not normalised
    tokens: list[int] | None  # tokens read per text, None when the backend does not report it


class EmbeddingBackend(Protocol):
    kind: str  # as reported by ListModels: "sentence-transformers", "tei", "ollama"

    @property
    def info(self) -> ModelInfo | None:
        """Dimensions and limits, once known (after `start` or a successful `ready`)."""
        ...

    async def start(self) -> None:
        """Load an in-process model (errors are fatal). Remote backends connect lazily."""
        ...

    async def ready(self) -> bool:
        """Whether the backend answers now; remote backends learn `info` on first success."""
        ...

    async def embed(self, texts: list[str], truncate: bool) -> Encoded:
        """Encode one batch. With truncate=False an over-long text is INVALID_ARGUMENT."""
        ...

    async def count_tokens(self, texts: list[str]) -> list[int] | None:
        """Token counts for a pre-check, or None when only the upstream can tell."""
        ...

    async def close(self) -> None: ...
