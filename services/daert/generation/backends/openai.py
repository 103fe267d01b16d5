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

Tools go as OpenAI's `tools` and `tool_choice`; assistant turns carry `tool_calls` and
tool results are `role: tool` messages with `tool_call_id`. Calls come back in
`message.tool_calls`, streamed as `delta.tool_calls` pieces (id and name first, then the
arguments' text in pieces), with finish_reason `tool_calls`. TGI's messages API differs:
its ids are "" (replaced by ids derived from the request), older releases sent the
arguments as an object and `tool_calls` as one object, and it ends a call with
`eos_token`'s "stop"; calls that end normally are reported FINISH_REASON_TOOL_CALLS.

Log probabilities: chat asks with `logprobs: true` and `top_logprobs: N` and gets
`choices[].logprobs.content[]` (`{"token", "logprob", "bytes", "top_logprobs"}`), streamed
per chunk for that chunk's tokens; /v1/completions asks with `logprobs: N` (the number of
alternatives; 0 is the sampled token's only) and gets `{"tokens", "token_logprobs",
"top_logprobs": [{token: logprob}], "text_offset"}`, streamed the same way. A token whose
text is held back (a stop sequence may be starting) keeps its entry in the next event.

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
    ToolCallStream,
    coded_error,
    error_text,
    json_answer,
    json_object,
    openai_logprobs,
    openai_tool_choice,
    openai_tools,
    sse_events,
    tgi_error,
    tool_calls,
    tool_finish,
)
from daert.generation.config import ModelConfig
from daert.generation.request import (
    Delta,
    Finished,
    GenerationInput,
    Message,
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
    "tool_calls": generation_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": generation_pb2.FINISH_REASON_TOOL_CALLS,  # OpenAI's deprecated name
}


class OpenAIBackend:
    kind = generation_pb2.GENERATION_BACKEND_OPENAI
    returns_logprobs = True

    def __init__(self, config: ModelConfig, url: str | None = None, label: str = LABEL) -> None:
        self.label = label  # TGI's backend sends tool requests through this one
        self.url = (url or config.url).rstrip("/")
        key = os.environ.get(config.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = http_client(self.url, config.timeout_s, config.connect_timeout_s, headers)

    def unsupported(self, request: GenerationInput) -> str | None:
        return None  # the server itself refuses what it cannot do

    async def probe(self) -> None:
        await send(
            self._http, "GET", "/v1/models", backend=self.label, url=self.url, invalid_field="model"
        )

    async def complete(self, call: UpstreamCall) -> Completion:
        path, body = _request(call, stream=False)
        response = await send(
            self._http, "POST", path, backend=self.label, url=self.url, invalid_field="params",
            json=body,
        )  # fmt: skip
        answer = json_answer(response, self.label)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = choice.get("text") if call.input.prompt is not None else None
        if text is None:
            text = message.get("content") or ""
        calls = tool_calls(message.get("tool_calls"), call.input)
        finished = _finished(choice, answer.get("usage"), call.input, called=bool(calls))
        return Completion(
            StopSequences(call.input.sampling.stop).cut(text, finished.reason),
            finished,
            calls,
            openai_logprobs(choice.get("logprobs"), call.input),
        )

    async def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        path, body = _request(call, stream=True)
        stop = StopSequences(call.input.sampling.stop)
        calls = ToolCallStream(call.input)
        last_choice: dict[str, Any] = {}
        usage: dict[str, Any] | None = None
        async with open_stream(
            self._http, path, backend=self.label, url=self.url, invalid_field="params", json=body
        ) as response:
            # Read to the end of the body, past [DONE]: a connection left mid-body is
            # closed instead of going back to the pool, and the next request would pay
            # for a new one.
            async for event in sse_events(response, self.label):
                if event.error:
                    raise coded_error(json_object(event.data, self.label), self.label)
                if event.data.strip() == "[DONE]":
                    continue
                chunk = json_object(event.data, self.label)
                if "error_type" in chunk:
                    raise tgi_error(chunk, self.label)
                if "error" in chunk or chunk.get("object") == "error":
                    raise Unavailable(f"{self.label} failed mid-stream: {error_text(chunk)}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = choice.get("text")
                    if text is None:
                        text = delta.get("content")
                    text = stop.feed(text or "")
                    logprobs = openai_logprobs(choice.get("logprobs"), call.input)
                    if text or logprobs:
                        yield Delta(text, logprobs)
                    for piece in calls.feed(delta.get("tool_calls")):
                        yield piece
                    if choice.get("finish_reason"):
                        last_choice = choice
                        if rest := stop.finish(_reason(choice, call.input)):
                            yield Delta(rest)
        if not last_choice:
            raise Unavailable(
                f"{self.label} at {self.url} ended the stream without a finish reason"
            )
        yield _finished(last_choice, usage, call.input, called=calls.called)

    async def close(self) -> None:
        await self._http.aclose()


def _request(call: UpstreamCall, *, stream: bool) -> tuple[str, dict[str, Any]]:
    request = call.input
    body: dict[str, Any] = {"model": call.model, "stream": stream}
    if request.prompt is not None:
        path, body["prompt"] = "/v1/completions", request.prompt
    else:
        path = "/v1/chat/completions"
        body["messages"] = [_message(m) for m in request.messages or ()]
        if request.tools:
            body["tools"] = openai_tools(request.tools)
            body["tool_choice"] = openai_tool_choice(request.tool_choice)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if request.logprobs:
        # Completions take the number of alternatives in `logprobs` itself.
        if request.prompt is not None:
            body["logprobs"] = request.top_logprobs
        else:
            body |= {"logprobs": True, "top_logprobs": request.top_logprobs}
    body.update(_sampling(request))
    body.update(_output(request.output, chat=request.prompt is None))
    return path, body


def _message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        wire["name"] = message.name
    if message.tool_calls:
        # OpenAI's own assistant turns that only call tools have content null.
        wire["content"] = message.content or None
        wire["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire


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
    choice: dict[str, Any],
    usage: dict[str, Any] | None,
    request: GenerationInput,
    *,
    called: bool,
) -> Finished:
    usage = usage or {}
    return Finished(
        tool_finish(_reason(choice, request), called),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
