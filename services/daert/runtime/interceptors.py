"""The server interceptor: request ids, access logs, metrics and error mapping for every RPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from daert.runtime.errors import ServiceError
from daert.runtime.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS
from daert.runtime.rpc_context import (
    REQUEST_ID_HEADER,
    deadline_var,
    new_request_id,
    request_id_var,
)
from daert.runtime.validation import check_request, decoder

log = logging.getLogger("daert.rpc")

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def _request_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return new_request_id()


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each of the service's own handlers (grpc.health and reflection pass through)."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler
        method: str = details.method
        request_id = _request_id_from(details.invocation_metadata)
        codec = {
            "request_deserializer": decoder(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, request_id), **codec
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, request_id), **codec
            )
        # Client-streaming RPCs are not part of any daert contract; leave them untouched.
        return handler

    def _wrap_unary(self, behavior: UnaryBehavior, method: str, request_id: str) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._rpc(method, request_id, context):
                check_request(request)
                return await behavior(request, context)

        return unary

    def _wrap_stream(
        self, behavior: StreamBehavior, method: str, request_id: str
    ) -> StreamBehavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._rpc(method, request_id, context):
                check_request(request)
                async for response in behavior(request, context):
                    yield response

        return stream

    @asynccontextmanager
    async def _rpc(
        self, method: str, request_id: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        # Each RPC runs in its own task, so this value is visible to everything the RPC
        # awaits (clients, HTTP backends, logs) and to nothing else.
        request_id_var.set(request_id)
        remaining = context.time_remaining()
        if remaining is not None:
            deadline_var.set(time.monotonic() + remaining)
        trailer: tuple[tuple[str, str | bytes], ...] = ((REQUEST_ID_HEADER, request_id),)
        context.set_trailing_metadata(trailer)
        short = method.rsplit("/", 1)[-1]
        in_flight = RPC_IN_FLIGHT.labels(self._service, short)
        in_flight.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except ServiceError as exc:
            code = exc.code
            status = exc.status_details()
            if status is not None:
                trailer += (("grpc-status-details-bin", status.SerializeToString()),)
            await context.abort(code, exc.message, trailer)
        except asyncio.CancelledError:
            left = context.time_remaining()
            expired = left is not None and left <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", method)
            await context.abort(code, f"internal error (request id {request_id})", trailer)
        finally:
            elapsed = time.perf_counter() - started
            in_flight.dec()
            RPC_REQUESTS.labels(self._service, short, code.name).inc()
            RPC_LATENCY.labels(self._service, short).observe(elapsed)
            log.info(
                "rpc",
                extra={"method": method, "code": code.name, "duration_ms": round(elapsed * 1e3, 2)},
            )
