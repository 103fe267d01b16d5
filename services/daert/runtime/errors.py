"""Errors a servicer raises; the runtime turns them into gRPC statuses.

Servicers never call `context.abort` themselves: they raise one of these, and the server
interceptor maps it to the status code, message and (for bad input) a google.rpc.BadRequest
detail that names the offending field, so clients can point at it programmatically.
"""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2


class ServiceError(Exception):
    """Base class: a failure that has a well-defined gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # True when trying again may succeed and nothing was done upstream: the connection was
    # refused, or the server shed the request (429/503). Set by runtime.upstream.
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def status_details(self) -> status_pb2.Status | None:
        """Rich status (google.rpc.Status) sent in `grpc-status-details-bin`, if any."""
        return None


class InvalidArgument(ServiceError):
    """The request is malformed; `field` names the offending field, e.g. ``inputs[3]``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def status_details(self) -> status_pb2.Status:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=self.field, description=self.problem
                )
            ]
        )
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=self.message)
        status.details.add().Pack(bad_request)
        return status


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The request is valid but cannot be served as asked; `field`, when set, names the
    request field that asks for what is missing (``logprobs``), as a PreconditionFailure
    violation whose subject it is."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def status_details(self) -> status_pb2.Status | None:
        if not self.field:
            return None
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="UNSUPPORTED", subject=self.field, description=self.message
                )
            ]
        )
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=self.message)
        status.details.add().Pack(failure)
        return status


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """Overload: our own queue is full, or an upstream answered 429/503."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A backend is down, refused the connection, timed out, or is still loading."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def downstream_error(
    error: grpc.aio.AioRpcError, needed_for: str, service: str, target: str
) -> ServiceError:
    """The status to answer with when the daert `service` this one calls (at `target`) has
    failed: overload stays RESOURCE_EXHAUSTED, anything else means the service we need is
    UNAVAILABLE. `needed_for` says what it was called for."""
    message = (
        f"{needed_for} needs the {service} service at {target}, which answered "
        f"{error.code().name}: {error.details()}"
    )
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message)
    return Unavailable(message)
