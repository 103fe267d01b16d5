"""What every request handler shares: the service clients, the key store, the limiter, the
model catalog; and the per-request `Caller` that authentication and limits produce."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from daert.clients import (
    ContextClient,
    EmbeddingClient,
    GenerationClient,
    LoraRouterClient,
    RerankClient,
    RetrievalClient,
    ServiceClient,
)
from daert.gateway.catalog import ModelCatalog
from daert.gateway.config import GatewaySettings
from daert.gateway.errors import ApiError
from daert.gateway.keys import ApiKey, KeyStore, KeyStoreUnavailable
from daert.gateway.limits import RateLimiter
from daert.gateway.metrics import TOKENS
from daert.gateway.rag import RagPipeline

log = logging.getLogger("daert.gateway")


@dataclass
class Clients:
    generation: GenerationClient
    embedding: EmbeddingClient
    retrieval: RetrievalClient
    rerank: RerankClient
    context: ContextClient
    lora: LoraRouterClient

    @classmethod
    def from_environment(cls, settings: GatewaySettings) -> Clients:
        timeout_s, size = settings.request_timeout_s, settings.max_receive_message_bytes
        return cls(
            GenerationClient(timeout_s=timeout_s, max_message_bytes=size),
            EmbeddingClient(timeout_s=timeout_s, max_message_bytes=size),
            RetrievalClient(timeout_s=timeout_s, max_message_bytes=size),
            RerankClient(timeout_s=timeout_s, max_message_bytes=size),
            ContextClient(timeout_s=timeout_s, max_message_bytes=size),
            LoraRouterClient(timeout_s=timeout_s, max_message_bytes=size),
        )

    def by_name(self) -> dict[str, ServiceClient]:
        return dict(vars(self))

    async def close(self) -> None:
        for client in vars(self).values():
            await client.close()


@dataclass
class Gateway:
    settings: GatewaySettings
    clients: Clients
    keys: KeyStore
    limiter: RateLimiter
    catalog: ModelCatalog
    rag: RagPipeline
    _recording: set[asyncio.Task[None]] = field(default_factory=set)

    def record_usage(self, caller: Caller, tokens: int) -> None:
        """Count a response's tokens against its key's limit, without holding up the
        response (or failing it: the limiter fails open on its own)."""
        if tokens <= 0:
            return
        TOKENS.labels(caller.tenant).inc(tokens)
        task = asyncio.get_running_loop().create_task(
            self.limiter.record_tokens(caller.key, tokens)
        )
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._recording, return_exceptions=True)
        await self.limiter.close()
        await self.keys.close()
        await self.clients.close()


@dataclass(frozen=True)
class Caller:
    """Who is asking: the API key and, through it, the tenant and its allowances."""

    key: ApiKey

    @property
    def tenant(self) -> str:
        return self.key.tenant

    def require_model(self, model: str) -> None:
        if not self.key.allows_model(model):
            raise ApiError(
                403,
                f"this API key may not use the model {model!r}",
                "permission_error",
                "model",
                "model_not_allowed",
            )

    def require_collection(self, collection: str) -> None:
        if not self.key.allows_collection(collection):
            raise ApiError(
                403,
                f"this API key may not read the collection {collection!r}",
                "permission_error",
                "rag.collection",
                "collection_not_allowed",
            )


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", None, "invalid_api_key")


async def authenticate(request: Request) -> Caller:
    """FastAPI dependency of every /v1 route: a valid bearer key, within its limits. The
    limit headers go on the response whatever its status (the middleware adds them)."""
    state = gateway(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
    try:
        key = await state.keys.authenticate(token.strip())
    except KeyStoreUnavailable as exc:
        log.warning("key store unavailable: %s", exc)
        raise ApiError(
            503,
            "the API key store is unavailable; try again",
            "server_error",
            None,
            "service_unavailable",
        ) from None
    if key is None:
        raise _unauthorized("invalid or revoked API key")
    request.state.key_id, request.state.tenant = key.id, key.tenant
    decision = await state.limiter.admit(key)
    request.state.rate_limit_headers = decision.headers
    if not decision.allowed:
        retry_after = max(1, round(decision.retry_after_s + 0.5))
        raise ApiError(
            429,
            f"rate limit reached for this API key; retry in {retry_after} s",
            "rate_limit_error",
            None,
            "rate_limit_exceeded",
            {**decision.headers, "retry-after": str(retry_after)},
        )
    return Caller(key)


# The caller of a /v1 route: `caller: Authenticated` in its signature.
Authenticated = Annotated[Caller, Depends(authenticate)]
