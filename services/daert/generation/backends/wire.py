"""Reading what inference servers send: answers and events that are JSON objects, SSE
streams, and the error events servers send inside a stream that has already answered 200;
tool calls, which every server spells in OpenAI's words with its own liberties; and token
log probabilities in OpenAI's two shapes and TGI's."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx

from daert.generation.request import (
    GenerationInput,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
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


# --- tool calls ----------------------------------------------------------------------------


def openai_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """OpenAI's `tools`, which Ollama and TGI's messages API also read."""
    wire = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        if tool.strict:
            function["strict"] = True
        wire.append({"type": "function", "function": function})
    return wire


def openai_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.kind == "function":
        return {"type": "function", "function": {"name": choice.function}}
    return choice.kind


def synthetic_call_id(request: GenerationInput, index: int) -> str:
    """An id for a call whose server gave none (Ollama; TGI sends ""): derived from the
    request, so a replay, a retry and the unary and streamed answers agree, and the calls of
    different turns of a conversation differ."""
    canonical = json.dumps(request.canonical(), sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{canonical}\0{index}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def arguments_text(arguments: Any) -> str:
    """Arguments as JSON text: OpenAI and vLLM send text already; Ollama and older TGI send
    the object itself."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


def tool_calls(raw: Any, request: GenerationInput) -> tuple[ToolCall, ...]:
    """The calls of an answer's `message.tool_calls` (TGI 2.x sent one object, not a list)."""
    entries = [raw] if isinstance(raw, dict) else raw or []
    calls = []
    for i, entry in enumerate(entries):
        function = entry.get("function") or {}
        calls.append(
            ToolCall(
                id=str(entry.get("id") or "") or synthetic_call_id(request, i),
                name=str(function.get("name") or ""),
                arguments=arguments_text(function.get("arguments")),
            )
        )
    return tuple(calls)


class ToolCallStream:
    """Reads streamed `delta.tool_calls` pieces: the first piece of each index gets the
    call's id (synthetic when the server sent none) and name, the later ones only
    arguments."""

    def __init__(self, request: GenerationInput) -> None:
        self._request = request
        self._started: set[int] = set()

    @property
    def called(self) -> bool:
        return bool(self._started)

    @property
    def count(self) -> int:
        """How many calls have started."""
        return len(self._started)

    def feed(self, raw: Any) -> list[ToolCallDelta]:
        entries = [raw] if isinstance(raw, dict) else raw or []
        deltas = []
        for position, entry in enumerate(entries):
            index = entry.get("index")
            index = index if isinstance(index, int) else position
            function = entry.get("function") or {}
            arguments = function.get("arguments")
            piece = "" if arguments is None else arguments_text(arguments)
            if index in self._started:
                if piece:
                    deltas.append(ToolCallDelta(index, arguments=piece))
                continue
            self._started.add(index)
            call_id = str(entry.get("id") or "") or synthetic_call_id(self._request, index)
            deltas.append(ToolCallDelta(index, call_id, str(function.get("name") or ""), piece))
        return deltas


_NORMAL_ENDS = (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_STOP_SEQUENCE)


def tool_finish(
    reason: generation_pb2.FinishReason.ValueType, called: bool
) -> generation_pb2.FinishReason.ValueType:
    """Ollama and TGI end a tool-calling answer as any other ("stop", "eos_token"): an answer
    that called tools and was not cut short waits for their results."""
    if called and reason in _NORMAL_ENDS:
        return generation_pb2.FINISH_REASON_TOOL_CALLS
    return reason


# --- log probabilities ---------------------------------------------------------------------

# What vLLM sends for a probability of 0 (JSON has no -Infinity); used for a value missing.
_NO_LOGPROB = -9999.0


def _logprob(token: Any, value: Any, top: list[tuple[Any, Any]], top_n: int) -> TokenLogprob:
    alternatives = sorted(((str(t), _value(v)) for t, v in top), key=lambda a: -a[1])
    # vLLM adds the sampled token to the alternatives when it is not among the top N.
    return TokenLogprob(str(token), _value(value), tuple(alternatives[:top_n]))


def _value(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else _NO_LOGPROB


def openai_logprobs(raw: Any, request: GenerationInput) -> tuple[TokenLogprob, ...]:
    """A choice's (or a streamed chunk's) `logprobs`, in chat's shape `{"content": [{"token",
    "logprob", "top_logprobs": [{"token", "logprob"}]}]}` or completions' `{"tokens",
    "token_logprobs", "top_logprobs": [{token: logprob}]}`; none unless the request asked."""
    if not request.logprobs or not isinstance(raw, dict):
        return ()
    n = request.top_logprobs
    if "content" in raw:
        return tuple(
            _logprob(
                entry.get("token"),
                entry.get("logprob"),
                [(t.get("token"), t.get("logprob")) for t in entry.get("top_logprobs") or ()],
                n,
            )
            for entry in raw.get("content") or ()
        )
    tops = raw.get("top_logprobs") or []
    return tuple(
        _logprob(token, value, list((tops[i] or {}).items()) if i < len(tops) else [], n)
        for i, (token, value) in enumerate(
            zip(raw.get("tokens") or (), raw.get("token_logprobs") or (), strict=False)
        )
    )


def tgi_logprob(token: dict[str, Any], top: Any, request: GenerationInput) -> TokenLogprob:
    """A TGI `Token {id, text, logprob, special}` with its position's `top_tokens`."""
    alternatives = [(t.get("text"), t.get("logprob")) for t in top or ()]
    return _logprob(token.get("text"), token.get("logprob"), alternatives, request.top_logprobs)
