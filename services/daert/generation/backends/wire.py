"""Reading what inference servers send: answers and events that are JSON objects, SSE
streams, and the error events servers send inside a stream that has already answered 200."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx

from daert.runtime.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from daert.runtime.upstream import error_for_code, json_body
from daert.v1 import generation_pb2

_LINE_END = re.compile(r"\r\n|\r|\n")


def json_object(data: str, label: str) -> dict[str, Any]:
    """One event's JSON object; anything else means the server broke its own format."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise Unavailable(f"{label} sent an event that is not JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise Unavailable(f"{label} sent an event that is not a JSON object: {data[:200]!r}")
    return value


def json_answer(response: httpx.Response, label: str) -> dict[str, Any]:
    """A whole (non-streaming) answer's JSON object."""
    value = json_body(response, label)
    if not isinstance(value, dict):
        raise Unavailable(
            f"{label} at {response.url} answered with JSON that is not an object: "
            f"{response.text[:200]!r}"
        )
    return value


def error_text(event: dict[str, Any]) -> str:
    """The message of an error event: {"error": "..."} (TGI, Ollama) or
    {"error": {"message": "..."}} / {"object": "error", "message": "..."} (vLLM)."""
    error = event.get("error", event)
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:500]


def tgi_error(event: dict[str, Any], label: str) -> ServiceError:
    """TGI's error event, {"error": "...", "error_type": ...}, on /generate_stream and on its
    messages API (/v1/chat/completions): both answer 200 even to bad or shed requests, and
    `error_type` says which status an HTTP answer would have had."""
    message = f"{label}: {error_text(event)}"
    match event.get("error_type"):
        case "validation":
            return InvalidArgument("params", message)
        case "overloaded":
            error = ResourceExhausted(message)
            error.retryable = True  # shed before any work, like an HTTP 429
            return error
    return Unavailable(message)


def coded_error(event: dict[str, Any], label: str) -> ServiceError:
    """An error event that carries the HTTP status it stands for, as llama.cpp's
    {"code": 400, "message": "...", "type": "..."} does: mapped like that status."""
    code = event.get("code")
    message = f"{label}: {error_text(event)}"
    if not isinstance(code, int):
        return Unavailable(message)
    return error_for_code(code, message, "params")


@dataclass(frozen=True)
class SseEvent:
    data: str
    error: bool = False  # an `error:` field (llama.cpp) rather than `data:`


async def sse_events(response: httpx.Response, label: str) -> AsyncGenerator[SseEvent, None]:
    """The events of an SSE body, `data:` with or without the space after the colon. Read
    here rather than by an SSE client library: those drop fields the SSE spec does not
    define, and llama.cpp sends a failure inside a started stream as an `error:` field.
    A body that is not an event stream (a proxy's HTML page with 200) is UNAVAILABLE."""
    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    if content_type != "text/event-stream":
        body = (await response.aread()).decode(errors="replace")
        raise Unavailable(
            f"{label} at {response.url} answered {content_type or 'no content type'}, not an "
            f"event stream: {body[:200]!r}"
        )
    data: list[str] = []
    errors: list[str] = []
    async with aclosing(_lines(response)) as lines:
        async for line in lines:
            if not line:  # a blank line ends the event
                if errors:
                    yield SseEvent("\n".join(errors), error=True)
                elif data:
                    yield SseEvent("\n".join(data))
                data, errors = [], []
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "error":
                errors.append(value)
            # Comments (":"), event, id and retry carry nothing these servers need.


async def _lines(response: httpx.Response) -> AsyncGenerator[str, None]:
    """Lines split only at CR, LF and CRLF, as SSE says (str.splitlines, which httpx uses,
    also splits at U+2028 and others that JSON may carry unescaped). An unterminated last
    line is an event cut off: dropped, as the SSE spec says."""
    pending = ""
    async for text in response.aiter_text():
        pending += text
        # A CR at the end may be the first half of a CRLF: decide with the next piece.
        complete = pending[:-1] if pending.endswith("\r") else pending
        *lines, rest = _LINE_END.split(complete)
        pending = rest + pending[len(complete) :]
        for line in lines:
            yield line


class StopSequences:
    """Cuts the stop sequence that TGI (native and messages API) leaves at the end of its
    text; the contract's text never has it. While streaming, text that could still become a
    stop sequence is held back until the next token decides it."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        self._held += text
        keep = max((_overlap(self._held, stop) for stop in self._stops), default=0)
        cut = len(self._held) - keep
        ready, self._held = self._held[:cut], self._held[cut:]
        return ready

    def finish(self, reason: generation_pb2.FinishReason.ValueType) -> str:
        held, self._held = self._held, ""
        return self.cut(held, reason)

    def cut(self, text: str, reason: generation_pb2.FinishReason.ValueType) -> str:
        if reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE:
            for stop in sorted(self._stops, key=len, reverse=True):
                if text.endswith(stop):
                    return text[: -len(stop)]
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop` (all of it
    included)."""
    for size in range(min(len(text), len(stop)), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
