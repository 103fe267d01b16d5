"""What every typed client shares: channel set-up, retries, deadlines and request ids."""

from __future__ import annotations

import json
import os
from types import TracebackType
from typing import Any, ClassVar, Self

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from daert.runtime.registry import DEFAULT_PORTS
from daert.runtime.rpc_context import REQUEST_ID_HEADER, current_request_id, remaining_s


class _CallDefaults:
    """Gives every outgoing call a deadline (the client's default unless the caller set one,
    never past the deadline of the RPC being served) and the current request id."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        request_id = current_request_id()
        if request_id and REQUEST_ID_HEADER not in metadata:
            metadata.add(REQUEST_ID_HEADER, request_id)
        timeout = remaining_s(self._timeout_s if details.timeout is None else details.timeout)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under one call type only, hence one class per type.
class _UnaryDefaults(_CallDefaults, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamDefaults(_CallDefaults, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def retry_service_config(full_service_name: str, max_attempts: int) -> str:
    """gRPC service config: retry UNAVAILABLE (nothing was processed) with backoff."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": full_service_name}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """For INVALID_ARGUMENT: {field: description} from the status's BadRequest detail."""
    status = rpc_status.from_call(error)
    violations: dict[str, str] = {}
    for detail in status.details if status else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def precondition_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    """For FAILED_PRECONDITION: the subjects (request fields) of the status's
    PreconditionFailure violations, in order."""
    status = rpc_status.from_call(error)
    subjects: list[str] = []
    for detail in status.details if status else ():
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            subjects += [v.subject for v in failure.violations if v.subject]
    return subjects


class ServiceClient:
    """Base of the typed clients: `client.stub` is the generated, fully typed async stub
    (``await client.stub.Embed(request)``) on a channel that adds deadlines, request ids
    and retries. The endpoint is the `target` argument, else `DAERT_<SERVICE>_TARGET`,
    else localhost and the service's default port."""

    service: ClassVar[str]  # "embedding"
    full_name: ClassVar[str]  # "daert.v1.EmbeddingService"
    stub_class: ClassVar[Any]  # the generated *Stub class
    stub: Any  # narrowed to the generated *AsyncStub by each client

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 4,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.target = target or os.environ.get(
            f"DAERT_{self.service.upper()}_TARGET", f"localhost:{DEFAULT_PORTS[self.service]}"
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if max_attempts > 1:  # gRPC rejects a retry policy of fewer than 2 attempts
            options += [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", retry_service_config(self.full_name, max_attempts)),
            ]
        else:
            options.append(("grpc.enable_retries", 0))
        self.channel = grpc.aio.insecure_channel(
            self.target,
            options=options,
            interceptors=[_UnaryDefaults(timeout_s), _StreamDefaults(timeout_s)],
        )
        self.stub = self.stub_class(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
