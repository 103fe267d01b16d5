"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status the openai SDK turns into its matching exception class (BadRequestError for 400,
RateLimitError for 429, ...). gRPC statuses from the services map onto them here, once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from daert.clients import field_violations, precondition_subjects

# gRPC code -> (HTTP status, OpenAI error type, OpenAI error code).
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "unsupported"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    # The caller went away; no one reads this, but the access log and metrics do.
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, "not_found_error", param, code)


# A contract field path that names an OpenAI parameter differently: sampling parameters
# live under `params.` in the contract and top-level in OpenAI's body.
_CONTRACT_PREFIXES = (("params.", ""),)


def param_for_field(contract_field: str, renames: dict[str, str] | None = None) -> str:
    """The OpenAI parameter behind a contract field path: `params.temperature` ->
    `temperature`, `inputs[3]` -> `input[3]` with renames={"inputs": "input"}."""
    name = contract_field
    for prefix, replacement in _CONTRACT_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
    head = re.match(r"[A-Za-z_]+", name)
    if head and renames and head.group(0) in renames:
        name = renames[head.group(0)] + name[head.end() :]
    return name


def from_grpc(error: grpc.aio.AioRpcError, renames: dict[str, str] | None = None) -> ApiError:
    status, kind, code = _GRPC_TO_HTTP.get(error.code(), (500, "server_error", "internal_error"))
    message = error.details() or error.code().name.lower()
    param = None
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(error)
        if violations:
            param = param_for_field(next(iter(violations)), renames)
    elif error.code() == grpc.StatusCode.FAILED_PRECONDITION:
        # What the backend cannot do, named by the request field asking for it (logprobs).
        subjects = precondition_subjects(error)
        if subjects:
            param = param_for_field(subjects[0], renames)
    return ApiError(status, message, kind, param, code)


def _loc_to_param(loc: tuple[int | str, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    # A union member's name (`str`, `list[...]`) is pydantic's, not the client's.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES))]
    if not parts:
        return None
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "function-after"})


def from_validation(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return bad_request(None, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(None, "the request body is not valid JSON")
    param = _loc_to_param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return bad_request(param, f"{param}: {message}{more}" if param else message + more)
