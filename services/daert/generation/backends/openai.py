"""OpenAI-compatible servers (vLLM, LoRAX, llama.cpp, TGI's messages API, OpenAI):
`POST /v1/chat/completions` for messages, `POST /v1/completions` for a raw prompt.

Streams are SSE: `data: {chunk}` events, each with `choices[0].delta.content` (chat) or
`choices[0].text` (completions), `finish_reason` on the last choice, then, because we ask
with `stream_options.include_usage`, a chunk with `"choices": []` and `usage`, then
`data: [DONE]`. vLLM reports the stop string that ended generation in `stop_reason`; TGI's
messages API says `stop_sequence` and, as its native API, keeps the stop string in the text,
which is cut as there (and held back while streaming). A
failure inside a stream that has answered 200 is an event: vLLM (and llama.cpp since its
server was split up) send `data: {"error": {...}}`; TGI's messages API sends its native
`data:{"error": "...", "error_type": ...}`, mapped as the TGI backend maps it (a validation
error is INVALID_ARGUMENT, an overload RESOURCE_EXHAUSTED and retried before the first
token); older llama.cpp servers send `error: {"code", "message", "type"}`, an SSE field SSE
clients drop, mapped like the HTTP status in `code`.

Sampling fields beyond OpenAI's (top_k, repetition_penalty, also as llama.cpp's
repeat_penalty) and vLLM's regex constraint (`structured_outputs.regex`) are sent only when
the caller sets them: OpenAI answers 400 to them, which reaches the caller as
INVALID_ARGUMENT; vLLM and llama.cpp ignore the fields they do not know.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

from daert.generation.backends.base import Completion, UpstreamCall
from daert.generation.backends.wire import (
    StopSequences,
    coded_error,
    error_text,
    json_answer,
    json_object,
    sse_events,
    tgi_error,
)
from daert.generation.config import ModelConfig
from daert.generation.request import (
    Delta,
    Finished,
    GenerationInput,
    OutputFormat,
    StreamEvent,
)
from daert.runtime.errors import Unavailable
from daert.runtime.upstream import http_client, open_stream, send
from daert.v1 import generation_pb2

LABEL = "OpenAI-compatible server"

_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    # TGI's messages API names its own reasons but for the end-of-sequence token.
    "stop_sequence": generation_pb2.FINISH_REASON_STOP_SEQUENCE,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "content_filter": generation_pb2.FINISH_REASON_CONTENT_FILTER,
    "abort": generation_pb2.FINISH_REASON_CANCELLED,
}


class OpenAIBackend:
    kind = generation_pb2.GENERATION_BACKEND_OPENAI
    label = LABEL

    def __init__(self, config: ModelConfig, url: str | None = None) -> None:
        self.url = (url or config.url).rstrip("/")
        key = os.environ.get(config.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = http_client(self.url, config.timeout_s, config.connect_timeout_s, headers)

    def unsupported(self, request: GenerationInput) -> str | None:
        return None  # the server itself refuses what it cannot do

    async def probe(self) -> None:
        await send(
            self._http, "GET", "/v1/models", backend=LABEL, url=self.url, invalid_field="model"
        )

    async def complete(self, call: UpstreamCall) -> Completion:
        path, body = _request(call, stream=False)
        response = await send(
            self._http, "POST", path, backend=LABEL, url=self.url, invalid_field="params",
            json=body,
        )  # fmt: skip
        answer = json_answer(response, LABEL)
        choice = (answer.get("choices") or [{}])[0]
        text = choice.get("text") if call.input.prompt is not None else None
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        finished = _finished(choice, answer.get("usage"), call.input)
        return Completion(
            StopSequences(call.input.sampling.stop).cut(text, finished.reason), finished
        )

    async def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        path, body = _request(call, stream=True)
        stop = StopSequences(call.input.sampling.stop)
        last_choice: dict[str, Any] = {}
        usage: dict[str, Any] | None = None
        async with open_stream(
            self._http, path, backend=LABEL, url=self.url, invalid_field="params", json=body
        ) as response:
            # Read to the end of the body, past [DONE]: a connection left mid-body is
            # closed instead of going back to the pool, and the next request would pay
            # for a new one.
            async for event in sse_events(response, LABEL):
                if event.error:
                    raise coded_error(json_object(event.data, LABEL), LABEL)
                if event.data.strip() == "[DONE]":
                    continue
                chunk = json_object(event.data, LABEL)
                if "error_type" in chunk:
                    raise tgi_error(chunk, LABEL)
                if "error" in chunk or chunk.get("object") == "error":
                    raise Unavailable(f"{LABEL} failed mid-stream: {error_text(chunk)}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text := stop.feed(text or ""):
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        last_choice = choice
                        if rest := stop.finish(_reason(choice, call.input)):
                            yield Delta(rest)
        if not last_choice:
            raise Unavailable(f"{LABEL} at {self.url} ended the stream without a finish reason")
        yield _finished(last_choice, usage, call.input)

    async def close(self) -> None:
        await self._http.aclose()


def _request(call: UpstreamCall, *, stream: bool) -> tuple[str, dict[str, Any]]:
    request = call.input
    body: dict[str, Any] = {"model": call.model, "stream": stream}
    if request.prompt is not None:
        path, body["prompt"] = "/v1/completions", request.prompt
    else:
        path = "/v1/chat/completions"
        body["messages"] = [_message(m.role, m.content, m.name) for m in request.messages or ()]
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(_sampling(request))
    body.update(_output(request.output, chat=request.prompt is None))
    return path, body


def _message(role: str, content: str, name: str) -> dict[str, str]:
    return {"role": role, "content": content} | ({"name": name} if name else {})


def _sampling(request: GenerationInput) -> dict[str, Any]:
    s = request.sampling
    fields = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        # vLLM's name and llama.cpp's; each ignores the other's.
        "repetition_penalty": s.repetition_penalty,
        "repeat_penalty": s.repetition_penalty,
        "seed": s.seed,
        "stop": list(s.stop) or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _output(output: OutputFormat, *, chat: bool) -> dict[str, Any]:
    if output.kind == "regex":
        return {"structured_outputs": {"regex": output.regex}}
    # /v1/completions has no response_format: vLLM constrains it with structured_outputs,
    # llama.cpp with a top-level json_schema; each ignores the other's field.
    if output.kind == "json_object":
        if chat:
            return {"response_format": {"type": "json_object"}}
        return {"structured_outputs": {"json_object": True}, "json_schema": {"type": "object"}}
    if output.kind == "json_schema":
        if chat:
            schema = {"name": output.name, "schema": output.schema, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": schema}}
        return {"structured_outputs": {"json": output.schema}, "json_schema": output.schema}
    return {}


def _reason(
    choice: dict[str, Any], request: GenerationInput
) -> generation_pb2.FinishReason.ValueType:
    reason = _FINISH.get(choice.get("finish_reason") or "", generation_pb2.FINISH_REASON_STOP)
    # vLLM names the stop string that matched; plain OpenAI says only "stop".
    stop_reason = choice.get("stop_reason")
    if reason == generation_pb2.FINISH_REASON_STOP and stop_reason in request.sampling.stop:
        reason = generation_pb2.FINISH_REASON_STOP_SEQUENCE
    return reason


def _finished(
    choice: dict[str, Any], usage: dict[str, Any] | None, request: GenerationInput
) -> Finished:
    usage = usage or {}
    return Finished(
        _reason(choice, request),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
