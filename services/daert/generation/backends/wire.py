"""Reading what inference servers send: one JSON object per SSE event or NDJSON line."""

from __future__ import annotations

import json
from typing import Any

from daert.runtime.errors import Unavailable


def json_object(data: str, label: str) -> dict[str, Any]:
    """One event's JSON object; anything else means the server broke its own format."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise Unavailable(f"{label} sent an event that is not JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise Unavailable(f"{label} sent an event that is not a JSON object: {data[:200]!r}")
    return value


def error_text(event: dict[str, Any]) -> str:
    """The message of an error event: {"error": "..."} (TGI, Ollama) or
    {"error": {"message": "..."}} / {"object": "error", "message": "..."} (vLLM)."""
    error = event.get("error", event)
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:500]
