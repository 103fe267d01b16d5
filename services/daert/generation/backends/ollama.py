"""Ollama: `POST /api/chat` for messages, `POST /api/generate` with `raw: true` for a raw
prompt (no template applied), `GET /api/tags` for readiness.

Streams are NDJSON: one object per line with `message.content` (chat) or `response`
(generate) and `"done": false`; the last has `"done": true`, `done_reason` ("stop",
"length") and the counts `prompt_eval_count` / `eval_count`. A failure inside a started
stream is a line `{"error": "..."}`. Sampling goes in `options` (num_predict, temperature,
top_p, top_k, repeat_penalty, seed, stop); structured output in `format` ("json" or a JSON
schema); Ollama has no regex constraint. Ollama reports the end of a stop sequence as
"stop", like the end-of-sequence token, so FINISH_REASON_STOP_SEQUENCE is never reported.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from daert.generation.backends.base import Completion, UpstreamCall
from daert.generation.backends.wire import error_text, json_answer, json_object
from daert.generation.config import ModelConfig
from daert.generation.request import Delta, Finished, GenerationInput, StreamEvent
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

    def __init__(self, config: ModelConfig) -> None:
        self.url = config.url.rstrip("/")
        self._model = config.upstream_name
        self._keep_alive = config.keep_alive
        self._http = http_client(self.url, config.timeout_s, config.connect_timeout_s)

    def unsupported(self, request: GenerationInput) -> str | None:
        if request.output.kind == "regex":
            return "Ollama cannot constrain output to a regular expression"
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
        return Completion(_text(answer), _finished(answer))

    async def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        path, body = self._request(call, stream=True)
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
                if chunk.get("done"):
                    finished = _finished(chunk)
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
            body["messages"] = [
                {"role": m.role, "content": m.content} for m in request.messages or ()
            ]
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


def _finished(chunk: dict[str, Any]) -> Finished:
    return Finished(
        _FINISH.get(chunk.get("done_reason") or "stop", generation_pb2.FINISH_REASON_STOP),
        prompt_tokens=int(chunk.get("prompt_eval_count") or 0),
        completion_tokens=int(chunk.get("eval_count") or 0),
    )
