"""The FastAPI application: routes, OpenAI-shaped errors, request ids, metrics and the
access log. `create_app` builds the shared state (clients, key store, limiter) at start-up."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daert.gateway.catalog import ModelCatalog
from daert.gateway.config import GatewaySettings
from daert.gateway.errors import ApiError, from_grpc, from_validation
from daert.gateway.keys import KeyStore
from daert.gateway.limits import RateLimiter
from daert.gateway.metrics import HTTP_LATENCY, HTTP_REQUESTS
from daert.gateway.rag import RagPipeline
from daert.gateway.routes import embeddings, generate, health, models, rerank
from daert.gateway.state import Clients, Gateway
from daert.runtime.rpc_context import REQUEST_ID_HEADER, new_request_id, request_id_var

log = logging.getLogger("daert.gateway")
access_log = logging.getLogger("daert.gateway.access")

# An inbound request id is passed on only if it is a plausible id (it ends up in logs and
# gRPC metadata); anything else is replaced.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Pure ASGI middleware (so a streamed response is never buffered or detached from its
    client): the request id in and out, the key's rate-limit headers, metrics, access log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbound = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = inbound if _REQUEST_ID.match(inbound) else new_request_id()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                limit_headers = scope.get("state", {}).get("rate_limit_headers") or {}
                for name, value in limit_headers.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            HTTP_REQUESTS.labels(label, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(label).observe(elapsed)
            state = scope.get("state", {})
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                    # Who asked: the key (never its secret) and the body's `user`, if any.
                    **{k: state[k] for k in ("key_id", "tenant", "end_user") if k in state},
                },
            )
            request_id_var.reset(token)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(exc).response()

    async def grpc_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, grpc.aio.AioRpcError)
        renames: dict[str, str] | None = getattr(request.state, "param_renames", None)
        error = from_grpc(exc, renames)
        if error.status >= 500:
            log.warning("service call failed: %s %s", exc.code().name, exc.details())
        return error.response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ApiError(
            exc.status_code, str(exc.detail), kind, None, None, dict(exc.headers or {})
        )
        return error.response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return ApiError(
            500, "internal error (logged with the request id)", "server_error"
        ).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(grpc.aio.AioRpcError, grpc_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def build_state(settings: GatewaySettings) -> Gateway:
    clients = Clients.from_environment(settings)
    return Gateway(
        settings=settings,
        clients=clients,
        keys=KeyStore(
            settings.dsn,
            cache_ttl_s=settings.key_cache_s,
            stale_grace_s=settings.key_stale_grace_s,
        ),
        limiter=RateLimiter(settings.redis_url or None),
        catalog=ModelCatalog(
            clients.generation, clients.embedding, clients.lora, settings.catalog_ttl_s
        ),
        rag=RagPipeline(
            embedding=clients.embedding,
            retrieval=clients.retrieval,
            rerank=clients.rerank,
            context=clients.context if settings.rag_context_service else None,
        ),
    )


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        await state.keys.open()
        app.state.gateway = state
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="daert gateway",
        summary="OpenAI-compatible REST API in front of the daert services",
        version="1",
        lifespan=lifespan,
    )
    for module in (generate, embeddings, models, rerank, health):
        app.include_router(module.router)
    _install_error_handlers(app)
    app.add_middleware(RequestContext)
    return app


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document without starting anything (for docs and tests)."""
    return create_app(GatewaySettings(dsn="postgresql://unused")).openapi()
