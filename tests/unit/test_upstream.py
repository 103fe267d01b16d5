"""The one mapping from upstream HTTP failures to gRPC status codes."""

from __future__ import annotations

import grpc
import httpx
import pytest
from daert.runtime.errors import InvalidArgument, Unavailable
from daert.runtime.upstream import error_for_status, http_client, transport_errors


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, {"error": "bad"}, grpc.StatusCode.INVALID_ARGUMENT),
        (413, {"error": "too big", "error_type": "Validation"}, grpc.StatusCode.INVALID_ARGUMENT),
        (422, {"error": "invalid"}, grpc.StatusCode.INVALID_ARGUMENT),
        (404, {"error": "model not found"}, grpc.StatusCode.NOT_FOUND),
        (401, {"error": {"message": "bad key"}}, grpc.StatusCode.FAILED_PRECONDITION),
        (429, {"error": "Model is overloaded"}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, "Service Unavailable", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (424, {"error": "backend"}, grpc.StatusCode.UNAVAILABLE),
        (500, {"error": "oops"}, grpc.StatusCode.UNAVAILABLE),
        (502, "Bad Gateway", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_status_mapping(status: int, body: object, code: grpc.StatusCode) -> None:
    if isinstance(body, dict):
        response = httpx.Response(status, json=body)
    else:
        response = httpx.Response(status, text=str(body))
    error = error_for_status(response, "TEI", invalid_field="inputs")
    assert error.code == code
    assert f"TEI answered {status}" in error.message
    if isinstance(error, InvalidArgument):
        assert error.field == "inputs"


def test_openai_style_error_message_is_extracted() -> None:
    response = httpx.Response(401, json={"error": {"message": "Incorrect API key", "code": 401}})
    assert "Incorrect API key" in error_for_status(response, "vLLM", "model").message


async def test_refused_connection_is_unavailable() -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with http_client(f"http://127.0.0.1:{port}", timeout_s=5) as client:
        with pytest.raises(Unavailable, match="unreachable"), transport_errors("TEI", "x"):
            await client.get("/health")
