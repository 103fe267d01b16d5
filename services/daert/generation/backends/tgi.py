"""Hugging Face Text Generation Inference, native API (also LoRAX, which speaks it):
`POST /generate`, `POST /generate_stream`, `GET /health`.

The request is `{"inputs": <text>, "parameters": {...}}`; `details: true` makes TGI report
the finish reason ("length", "eos_token", "stop_sequence") and token counts. The stream is
SSE, one `data:` event per token (`token.text`), the last one also carrying
`generated_text` and `details` (`finish_reason`, `generated_tokens`, `input_length`).
/generate_stream always answers 200: a bad or shed request, and a failure inside a started
stream, are an event `{"error": ..., "error_type": ...}` ("validation", "overloaded",
"generation", "incomplete_generation").

TGI's native API takes text, not messages: chat messages are formatted with the model's
`chat_template` (Jinja, as in Hugging Face tokenizer configs) here. TGI includes the stop
sequence that ended generation in its text; the contract does not, so it is cut off (and
held back while streaming, until it is known whether it completes a stop sequence).
Greedy decoding (temperature 0) is `do_sample: false`, since TGI wants temperature > 0.

Log probabilities come with `details: true`, which every request sets: each token's
`logprob` in `details.tokens` (unary) or the stream's `token`; `top_n_tokens: N` adds the
N most likely at each position (`details.top_tokens`, one list per token, or the event's
`top_tokens`). Special tokens (the end-of-sequence token) have no entry, as their text is
not part of the answer. The tokens of a stop sequence TGI leaves in its text keep their
entries, though the text is cut.

Tools exist only on TGI's messages API: a request with tools, or a conversation holding
tool calls or results, goes to the same server's `/v1/chat/completions` instead (OpenAI's
wire format, read by the OpenAI backend, with TGI's chat template; see that module for
TGI's differences). TGI's own quirk: with `tool_choice` "auto" it may call a tool even when
the answer needs none (its docs say "auto" always chooses one).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from daert.generation.backends.base import Completion, UpstreamCall
from daert.generation.backends.openai import OpenAIBackend
from daert.generation.backends.wire import (
    StopSequences,
    json_answer,
    json_object,
    sse_events,
    tgi_error,
    tgi_logprob,
)
from daert.generation.config import ModelConfig
from daert.generation.request import Delta, Finished, GenerationInput, StreamEvent, TokenLogprob
from daert.runtime.errors import FailedPrecondition, Unavailable
from daert.runtime.upstream import http_client, open_stream, send
from daert.v1 import generation_pb2

LABEL = "TGI"

_FINISH = {
    "eos_token": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "stop_sequence": generation_pb2.FINISH_REASON_STOP_SEQUENCE,
}


class TgiBackend:
    kind = generation_pb2.GENERATION_BACKEND_TGI
    label = LABEL
    returns_logprobs = True

    def __init__(self, config: ModelConfig, url: str | None = None) -> None:
        self.url = (url or config.url).rstrip("/")
        self._name = config.name
        self._template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
                config.chat_template
            )
            if config.chat_template
            else None
        )
        self._http = http_client(self.url, config.timeout_s, config.connect_timeout_s)
        self._messages_api = OpenAIBackend(config, self.url, label="TGI messages API")

    def unsupported(self, request: GenerationInput) -> str | None:
        if request.uses_tools:
            return None  # the messages API applies the server's own template
        if request.messages is not None and self._template is None:
            return (
                f"model {self._name!r} (TGI native API) takes a raw prompt: set its "
                "chat_template, or serve it with backend openai (TGI's messages API)"
            )
        return None

    async def probe(self) -> None:
        await send(self._http, "GET", "/health", backend=LABEL, url=self.url, invalid_field="")

    async def complete(self, call: UpstreamCall) -> Completion:
        if call.input.uses_tools:
            return await self._messages_api.complete(_messages_call(call))
        response = await send(
            self._http, "POST", "/generate", backend=LABEL, url=self.url,
            invalid_field="params", json=self._body(call),
        )  # fmt: skip
        answer = json_answer(response, LABEL)
        details = answer.get("details") or {}
        stop = StopSequences(call.input.sampling.stop)
        finished = _finished(details, response.headers.get("x-prompt-tokens"))
        text = stop.cut(str(answer.get("generated_text") or ""), finished.reason)
        logprobs: tuple[TokenLogprob, ...] = ()
        if call.input.logprobs:
            tokens = details.get("tokens") or []
            tops = details.get("top_tokens") or [None] * len(tokens)
            logprobs = tuple(
                tgi_logprob(token, top, call.input)
                for token, top in zip(tokens, tops, strict=False)
                if not token.get("special")
            )
        return Completion(text, finished, logprobs=logprobs)

    async def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        if call.input.uses_tools:
            async with aclosing(self._messages_api.stream(_messages_call(call))) as messages:
                async for piece in messages:
                    yield piece
            return
        stop = StopSequences(call.input.sampling.stop)
        finished: Finished | None = None
        async with open_stream(
            self._http, "/generate_stream", backend=LABEL, url=self.url,
            invalid_field="params", json=self._body(call),
        ) as response:  # fmt: skip
            async for event in sse_events(response, LABEL):
                chunk = json_object(event.data, LABEL)
                if "error" in chunk:
                    raise tgi_error(chunk, LABEL)
                token = chunk.get("token") or {}
                if not token.get("special"):
                    text = stop.feed(str(token.get("text") or ""))
                    logprobs = (
                        (tgi_logprob(token, chunk.get("top_tokens"), call.input),)
                        if call.input.logprobs
                        else ()
                    )
                    if text or logprobs:
                        yield Delta(text, logprobs)
                if chunk.get("details") is not None:
                    finished = _finished(chunk["details"], None)
                    if rest := stop.finish(finished.reason):
                        yield Delta(rest)
        # Finished only once the body has ended: a connection left mid-body is closed
        # instead of going back to the pool.
        if finished is None:
            raise Unavailable(f"{LABEL} at {self.url} ended the stream without details")
        yield finished

    def _body(self, call: UpstreamCall) -> dict[str, Any]:
        request = call.input
        reason = self.unsupported(request)
        if reason:
            raise FailedPrecondition(reason)
        if request.messages is not None:
            assert self._template is not None
            inputs = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                # TGI's tokenizer adds the BOS token itself.
                bos_token="",
                eos_token="",
            )
        else:
            assert request.prompt is not None
            inputs = request.prompt
        s = request.sampling
        parameters: dict[str, Any] = {"details": True, "return_full_text": False}
        if request.logprobs and request.top_logprobs:
            parameters["top_n_tokens"] = request.top_logprobs
        if s.temperature is not None and s.temperature > 0:
            parameters |= {"do_sample": True, "temperature": s.temperature}
        elif s.temperature == 0:
            parameters["do_sample"] = False
        optional = {
            "max_new_tokens": s.max_tokens,
            # TGI wants top_p < 1; 1 is no truncation, the same as leaving it out.
            "top_p": s.top_p if s.top_p is not None and s.top_p < 1 else None,
            "top_k": s.top_k,
            "repetition_penalty": s.repetition_penalty,
            "seed": s.seed,
            "stop": list(s.stop) or None,
            "adapter_id": call.adapter,
            "adapter_source": call.adapter_source,
        }
        parameters |= {k: v for k, v in optional.items() if v is not None}
        output = request.output
        if output.kind == "json_object":
            parameters["grammar"] = {"type": "json", "value": {"type": "object"}}
        elif output.kind == "json_schema":
            parameters["grammar"] = {"type": "json", "value": output.schema}
        elif output.kind == "regex":
            parameters["grammar"] = {"type": "regex", "value": output.regex}
        return {"inputs": inputs, "parameters": parameters}

    async def close(self) -> None:
        await self._http.aclose()
        await self._messages_api.close()


def _messages_call(call: UpstreamCall) -> UpstreamCall:
    """The call as TGI's messages API takes it: the adapter (TGI's LORA_ADAPTERS name) is
    the `model`; without one TGI serves its base model whatever `model` says."""
    return UpstreamCall(call.input, call.adapter or call.model)


def _finished(details: dict[str, Any], prompt_tokens_header: str | None) -> Finished:
    prompt_tokens = details.get("input_length") or prompt_tokens_header or 0
    return Finished(
        _FINISH.get(details.get("finish_reason") or "", generation_pb2.FINISH_REASON_STOP),
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(details.get("generated_tokens") or 0),
    )
