"""The configured models of a service that serves several (embedding, rerank): their
lifecycle as one set, and the lookup of the model a request names."""

from __future__ import annotations

import asyncio
from collections.abc import ItemsView
from typing import Generic, Protocol, TypeVar

from daert.runtime.errors import NotFound


class ServedModel(Protocol):
    ready: bool  # as of the last readiness check

    async def start(self) -> None: ...

    async def check_ready(self) -> bool: ...

    async def close(self) -> None: ...


ModelT = TypeVar("ModelT", bound=ServedModel)


class ModelSet(Generic[ModelT]):
    """Models by name; the first one given is the default, used when a request names none."""

    def __init__(self, models: dict[str, ModelT], kind: str = "model") -> None:
        self._models = models
        self._kind = kind  # what the error for an unknown name calls them
        self.default = next(iter(models))

    def get(self, name: str) -> ModelT:
        """The model `name` (empty: the default); NOT_FOUND listing the known ones."""
        model = self._models.get(name or self.default)
        if model is None:
            known = ", ".join(self._models)
            raise NotFound(
                f"{self._kind} {name!r} is not served here; known {self._kind}s: {known}"
            )
        return model

    def items(self) -> ItemsView[str, ModelT]:
        return self._models.items()

    async def start(self) -> None:
        await asyncio.gather(*(model.start() for model in self._models.values()))

    async def ready(self) -> bool:
        """Ready when the default model answers; every model's own state is kept for
        ListModels."""
        await asyncio.gather(*(model.check_ready() for model in self._models.values()))
        return self._models[self.default].ready

    async def close(self) -> None:
        await asyncio.gather(*(model.close() for model in self._models.values()))
