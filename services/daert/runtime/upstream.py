"""Calling HTTP model servers (TEI, Ollama, TGI, OpenAI-compatible): one client factory and
one mapping from upstream failures to gRPC statuses, shared by every backend.

| upstream                               | gRPC status          |
|----------------------------------------|----------------------|
| 400, 413, 422                          | INVALID_ARGUMENT     |
| 404                                    | NOT_FOUND            |
| 401, 403                               | FAILED_PRECONDITION  |
| 429, 503                               | RESOURCE_EXHAUSTED   |
| other 4xx/5xx, refused, reset, timeout | UNAVAILABLE          |
| a success whose body is not JSON       | UNAVAILABLE          |

Refused connections and 429/503 are marked `retryable`: the upstream did no work.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from daert.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from daert.runtime.rpc_context import REQUEST_ID_HEADER, current_request_id


async def _add_request_id(request: httpx.Request) -> None:
    request_id = current_request_id()
    if request_id and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = request_id


def http_client(
    base_url: str,
    timeout_s: float,
    connect_timeout_s: float = 2.0,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """An async client for one upstream: short connect timeout, so a dead backend fails fast,
    and the caller's request id on every request."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        headers=headers,
        event_hooks={"request": [_add_request_id]},
    )


def upstream_message(response: httpx.Response) -> str:
    """The error text an upstream put in its body: {"error": "..."} (TEI, TGI, Ollama) or
    {"error": {"message": "..."}} (OpenAI-compatible servers), else the raw text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body.get("message", body))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:500]
    return str(body)[:500]


def error_for_status(response: httpx.Response, backend: str, invalid_field: str) -> ServiceError:
    """The ServiceError for a failed upstream response; `invalid_field` is the request field
    blamed when the upstream rejects the input (400/413/422)."""
    status = response.status_code
    message = f"{backend} answered {status}: {upstream_message(response)}"
    return error_for_code(status, message, invalid_field)


def error_for_code(status: int, message: str, invalid_field: str) -> ServiceError:
    """The ServiceError for an HTTP status code, also one a server puts in an error it sends
    inside a started stream (llama.cpp's `code`)."""
    if status in (400, 413, 422):
        return InvalidArgument(invalid_field, message)
    if status == 404:
        return NotFound(message)
    if status in (401, 403):
        return FailedPrecondition(message)
    if status in (429, 503):
        error = ResourceExhausted(message)
        error.retryable = True
        return error
    return Unavailable(message)


def json_body(response: httpx.Response, backend: str) -> Any:
    """A successful answer's JSON. A body that is not JSON (a proxy's HTML page, a cut-off
    answer) is UNAVAILABLE naming the server, not a failure of ours."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unavailable(
            f"{backend} at {response.url} answered {response.status_code} with a body that "
            f"is not JSON: {response.text[:200]!r}"
        ) from exc


def raise_for_status(response: httpx.Response, backend: str, invalid_field: str) -> None:
    if response.is_error:
        raise error_for_status(response, backend, invalid_field)


@contextmanager
def transport_errors(backend: str, url: str) -> Iterator[None]:
    """Map connection-level failures (refused, reset, DNS, timeouts) to UNAVAILABLE."""
    try:
        yield
    except httpx.TimeoutException as exc:
        error = Unavailable(f"{backend} at {url} timed out ({type(exc).__name__})")
        error.retryable = isinstance(exc, httpx.ConnectTimeout)
        raise error from exc
    except httpx.TransportError as exc:
        error = Unavailable(f"{backend} at {url} is unreachable: {exc or type(exc).__name__}")
        error.retryable = isinstance(exc, httpx.ConnectError)
        raise error from exc


async def send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    backend: str,
    url: str,
    invalid_field: str,
    json: Any = None,
) -> httpx.Response:
    """One upstream call with every failure mapped to a gRPC status: connection-level ones
    by `transport_errors`, error statuses by `error_for_status`."""
    with transport_errors(backend, url):
        response = await client.request(method, path, json=json)
    raise_for_status(response, backend, invalid_field)
    return response


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    path: str,
    *,
    backend: str,
    url: str,
    invalid_field: str,
    json: Any,
) -> AsyncIterator[httpx.Response]:
    """POST and hold the response open for streaming (SSE, NDJSON). An error status is
    raised before the body is read as a stream; failures while reading it (reset, timeout)
    are mapped too. Leaving the block, however it is left, closes the connection: that is
    how a streaming server learns the caller has gone and stops generating."""
    with transport_errors(backend, url):
        async with client.stream("POST", path, json=json) as response:
            if response.is_error:
                await response.aread()
                raise error_for_status(response, backend, invalid_field)
            yield response
