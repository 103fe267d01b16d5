"""Ollama: `POST /api/chat` for messages, `POST /api/generate` with `raw: true` for a raw
prompt (no template applied), `GET /api/tags` for readiness.

Streams are NDJSON: one object per line with `message.content` (chat) or `response`
(generate) and `"done": false`; the last has `"done": true`, `done_reason` ("stop",
"length") and the counts `prompt_eval_count` / `eval_count`. A failure inside a started
stream is a line `{"error": "..."}`. Sampling goes in `options` (num_predict, temperature,
top_p, top_k, repeat_penalty, seed, stop); structured output in `format` ("json" or a JSON
schema); Ollama has no regex constraint. Ollama reports the end of a stop sequence as
"stop", like the end-of-sequence token, so FINISH_REASON_STOP_SEQUENCE is never reported.

Tools go in `tools` (OpenAI's shape) on /api/chat. Ollama has no `tool_choice`: NONE sends
no tools, REQUIRED and FUNCTION cannot be honoured (FAILED_PRECONDITION). A call comes back
in `message.tool_calls` as `{"function": {"name", "arguments": {...}}}`, the arguments an
object, not JSON text, and without an id (newer releases add one); streamed, each call
arrives whole in one chunk. Ids missing are derived from the request, and an answer with
calls that ended "stop" is FINISH_REASON_TOOL_CALLS. Assistant turns go back with their
`tool_calls` (arguments as objects), tool results as `role: tool` with `tool_name`, the
name of the call answered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from daert.generation.backends.base import Completion, UpstreamCall
from daert.generation.backends.wire import (
    ToolCallStream,
    error_text,
    json_answer,
    json_object,
    openai_tools,
    tool_calls,
    tool_finish,
)
from daert.generation.config import ModelConfig
from daert.generation.request import Delta, Finished, GenerationInput, Message, StreamEvent
from daert.runtime.errors import Unavailable
from daert.runtime.upstream import http_client, open_stream, send
from daert.v1 import generation_pb2

LABEL = "Ollama"

_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}


def _canonical(tag: str) -> str:
    """`llama3.2` and `llama3.2:latest` name the same model."""
    return tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"


class OllamaBackend:
    kind = generation_pb2.GENERATION_BACKEND_OLLAMA
    label = LABEL
    # Ollama returns `logprobs` only since 0.12.11; the releases this backend is written
    # and tested against (0.12.6) have none, so requests for them are refused up front.
    returns_logprobs = False

    def __init__(self, config: ModelConfig) -> None:
        self.url = config.url.rstrip("/")
        self._model = config.upstream_name
        self._keep_alive = config.keep_alive
        self._http = http_client(self.url, config.timeout_s, config.connect_timeout_s)

    def unsupported(self, request: GenerationInput) -> str | None:
        if request.output.kind == "regex":
            return "Ollama cannot constrain output to a regular expression"
        if request.tools and request.tool_choice.kind in ("required", "function"):
            return (
                f"Ollama has no tool_choice: it cannot be made to call a tool "
                f"(TOOL_CHOICE_MODE_{request.tool_choice.kind.upper()})"
            )
        return None

    async def probe(self) -> None:
        response = await send(
            self._http, "GET", "/api/tags", backend=LABEL, url=self.url, invalid_field="model"
        )
        tags = json_answer(response, LABEL)
        names = {_canonical(m.get("name", "")) for m in tags.get("models") or ()}
        if _canonical(self._model) not in names:
            raise Unavailable(
                f"{LABEL} at {self.url} does not have model {self._model!r} "
                f"(run: ollama pull {self._model})"
            )

    async def complete(self, call: UpstreamCall) -> Completion:
        path, body = self._request(call, stream=False)
        response = await send(
            self._http, "POST", path, backend=LABEL, url=self.url, invalid_field="params",
            json=body,
        )  # fmt: skip
        answer = json_answer(response, LABEL)
        if "error" in answer:
            raise Unavailable(f"{LABEL} failed: {error_text(answer)}")
        calls = tool_calls((answer.get("message") or {}).get("tool_calls"), call.input)
        return Completion(_text(answer), _finished(answer, called=bool(calls)), calls)

    async def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        path, body = self._request(call, stream=True)
        calls = ToolCallStream(call.input)
        finished: Finished | None = None
        async with open_stream(
            self._http, path, backend=LABEL, url=self.url, invalid_field="params", json=body
        ) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                chunk = json_object(line, LABEL)
                if "error" in chunk:
                    raise Unavailable(f"{LABEL} failed mid-stream: {error_text(chunk)}")
                text = _text(chunk)
                if text:
                    yield Delta(text)
                # Each chunk's calls are whole and numbered from 0 again: give them the
                # indexes after the calls before.
                raw = (chunk.get("message") or {}).get("tool_calls") or []
                for piece in calls.feed(
                    [{**entry, "index": calls.count + i} for i, entry in enumerate(raw)]
                ):
                    yield piece
                if chunk.get("done"):
                    finished = _finished(chunk, called=calls.called)
        # Finished only once the body has ended: a connection left mid-body is closed
        # instead of going back to the pool.
        if finished is None:
            raise Unavailable(f"{LABEL} at {self.url} ended the stream before done")
        yield finished

    def _request(self, call: UpstreamCall, *, stream: bool) -> tuple[str, dict[str, Any]]:
        request = call.input
        body: dict[str, Any] = {"model": call.model, "stream": stream}
        if request.prompt is not None:
            path = "/api/generate"
            body |= {"prompt": request.prompt, "raw": True}
        else:
            path = "/api/chat"
            messages = request.messages or ()
            body["messages"] = [_message(m, messages) for m in messages]
            if request.tools and request.tool_choice.kind != "none":
                body["tools"] = openai_tools(request.tools)
        s = request.sampling
        options = {
            "num_predict": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "repeat_penalty": s.repetition_penalty,
            "seed": s.seed,
            "stop": list(s.stop) or None,
        }
        body["options"] = {k: v for k, v in options.items() if v is not None}
        if request.output.kind == "json_object":
            body["format"] = "json"
        elif request.output.kind == "json_schema":
            body["format"] = request.output.schema
        if self._keep_alive is not None:
            body["keep_alive"] = self._keep_alive
        return path, body

    async def close(self) -> None:
        await self._http.aclose()


def _text(chunk: dict[str, Any]) -> str:
    if "response" in chunk:  # /api/generate
        return str(chunk["response"] or "")
    return str((chunk.get("message") or {}).get("content") or "")


def _message(message: Message, conversation: tuple[Message, ...]) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        wire["tool_name"] = message.name or _called_name(message.tool_call_id, conversation)
    return wire


def _called_name(call_id: str, conversation: tuple[Message, ...]) -> str:
    """The name of the tool whose call `call_id` is (Ollama names results by tool, not by
    call); the latest call with that id, since ids are only sure to be unique within one
    answer."""
    for message in reversed(conversation):
        for call in message.tool_calls:
            if call.id == call_id:
                return call.name
    return ""


def _finished(chunk: dict[str, Any], *, called: bool) -> Finished:
    reason = _FINISH.get(chunk.get("done_reason") or "stop", generation_pb2.FINISH_REASON_STOP)
    return Finished(
        tool_finish(reason, called),
        prompt_tokens=int(chunk.get("prompt_eval_count") or 0),
        completion_tokens=int(chunk.get("eval_count") or 0),
    )
