"""Which model names a client may ask for, and what each one means to the services: a
generation model, a LoRA adapter on its base model (through the LoRA router), or an
embedding model. Read from the services' ListModels / ListAdapters, reused for a few seconds
so that resolving a name costs no round trip on the hot path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import grpc

from daert.clients import EmbeddingClient, GenerationClient, LoraRouterClient
from daert.v1 import embedding_pb2, generation_pb2, lora_pb2

ModelKind = Literal["generation", "adapter", "embedding"]
_ADAPTERS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CatalogModel:
    id: str
    kind: ModelKind
    owned_by: str
    # Generation: the model to send; for an adapter its base model ("" = the default model).
    generation_model: str = ""
    adapter_id: str = ""
    # Prompt plus completion tokens; 0 when the backend does not say.
    context_length: int = 0
    supports_tools: bool = False
    # Generation: the base model the LoRA router knows it by ("" = takes no adapters).
    base_model: str = ""


_BACKEND_OWNERS = {
    generation_pb2.GENERATION_BACKEND_TGI: "tgi",
    generation_pb2.GENERATION_BACKEND_OLLAMA: "ollama",
    generation_pb2.GENERATION_BACKEND_OPENAI: "openai-compatible",
}


class _Cached:
    """One list, refreshed when older than `ttl_s`; concurrent misses share one refresh."""

    def __init__(self, load: Callable[[], Awaitable[list[CatalogModel]]], ttl_s: float) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._value: list[CatalogModel] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> list[CatalogModel]:
        if self._value is not None and time.monotonic() - self._at < self._ttl_s:
            return self._value
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._ttl_s:
                self._value = await self._load()
                self._at = time.monotonic()
            return self._value


class ModelCatalog:
    def __init__(
        self,
        generation: GenerationClient,
        embedding: EmbeddingClient,
        lora: LoraRouterClient | None,
        ttl_s: float,
    ) -> None:
        self._generation = generation
        self._embedding = embedding
        self._lora = lora
        self._ttl_s = ttl_s
        self._generation_models = _Cached(self._load_generation, ttl_s)
        self._embedding_models = _Cached(self._load_embedding, ttl_s)
        self._adapters: dict[str, _Cached] = {}

    async def _load_generation(self) -> list[CatalogModel]:
        reply = await self._generation.stub.ListModels(
            generation_pb2.GenerationServiceListModelsRequest()
        )
        return [
            CatalogModel(
                id=m.name,
                kind="generation",
                owned_by=_BACKEND_OWNERS.get(m.backend, "daert"),
                generation_model=m.name,
                context_length=m.context_length,
                supports_tools=m.supports_tools,
                base_model=m.base_model,
            )
            for m in reply.models
        ]

    async def _load_embedding(self) -> list[CatalogModel]:
        reply = await self._embedding.stub.ListModels(
            embedding_pb2.EmbeddingServiceListModelsRequest()
        )
        return [CatalogModel(id=m.name, kind="embedding", owned_by=m.backend) for m in reply.models]

    async def _load_adapters(self, tenant: str) -> list[CatalogModel]:
        if self._lora is None:
            return []
        try:
            # Short: a router that is down must not hold up every catalog refresh.
            reply = await self._lora.stub.ListAdapters(
                lora_pb2.ListAdaptersRequest(tenant=tenant), timeout=_ADAPTERS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            # Adapters are optional: without a router the base models still answer.
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return []
            raise
        # An adapter applies to the generation model serving its base model.
        bases = {m.base_model: m for m in await self._generation_models.get() if m.base_model}
        models = []
        for adapter in reply.adapters:
            base = bases.get(adapter.base_model)
            if base is None:
                continue  # no model here serves its base: it could not answer
            models.append(
                CatalogModel(
                    id=adapter.name,
                    kind="adapter",
                    owned_by=f"adapter of {adapter.base_model}",
                    generation_model=base.id,
                    adapter_id=adapter.name,
                    context_length=base.context_length,
                    supports_tools=base.supports_tools,
                )
            )
        return models

    def _adapters_for(self, tenant: str) -> _Cached:
        if tenant not in self._adapters:
            self._adapters[tenant] = _Cached(lambda: self._load_adapters(tenant), self._ttl_s)
        return self._adapters[tenant]

    async def chat_models(self, tenant: str) -> list[CatalogModel]:
        return [*await self._generation_models.get(), *await self._adapters_for(tenant).get()]

    async def embedding_models(self) -> list[CatalogModel]:
        return await self._embedding_models.get()

    async def all_models(self, tenant: str) -> list[CatalogModel]:
        return [*await self.chat_models(tenant), *await self.embedding_models()]

    async def find_chat(self, tenant: str, name: str) -> CatalogModel | None:
        return next((m for m in await self.chat_models(tenant) if m.id == name), None)

    async def find_embedding(self, name: str) -> CatalogModel | None:
        return next((m for m in await self.embedding_models() if m.id == name), None)
