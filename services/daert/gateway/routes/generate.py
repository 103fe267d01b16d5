"""POST /v1/chat/completions and POST /v1/completions: unary and streamed, tool calls, and
retrieval-augmented answers with citations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from daert.gateway import rag, translate
from daert.gateway.catalog import CatalogModel
from daert.gateway.errors import bad_request, from_grpc, not_found
from daert.gateway.rag import Citation, RagOptionError, RagOptions
from daert.gateway.schemas import ChatCompletionRequest, CompletionRequest
from daert.gateway.state import Authenticated, Caller, Gateway, gateway
from daert.gateway.streaming import DONE, GenerationStream, event, sse_response
from daert.v1 import common_pb2, generation_pb2

router = APIRouter(tags=["generation"])

# The completion budget assumed for fitting a RAG prompt when the request sets none.
_DEFAULT_COMPLETION_BUDGET = 512
# The context window assumed when the backend does not report one.
_DEFAULT_CONTEXT_LENGTH = 4096


async def _model(state: Gateway, caller: Caller, name: str) -> CatalogModel:
    caller.require_model(name)
    model = await state.catalog.find_chat(caller.tenant, name)
    if model is None:
        raise not_found(
            f"the model {name!r} does not exist; GET /v1/models lists them",
            "model",
            "model_not_found",
        )
    return model


async def _ground(
    state: Gateway, caller: Caller, body: ChatCompletionRequest, model: CatalogModel
) -> tuple[list[common_pb2.ChatMessage], list[Citation]]:
    assert body.rag is not None
    caller.require_collection(body.rag.collection)
    fields = translate.generate_fields(body, model, caller.tenant)
    completion = body.max_completion_tokens or body.max_tokens or _DEFAULT_COMPLETION_BUDGET
    budget = (model.context_length or _DEFAULT_CONTEXT_LENGTH) - completion
    if budget <= 0:
        raise bad_request("max_tokens", "leaves no room in the model's context for passages")
    wanted = body.rag
    try:
        options = RagOptions(
            wanted.collection, wanted.top_k, wanted.top_n, wanted.filter, wanted.mode
        )
        grounded = await state.rag.ground(
            tenant=caller.tenant, options=options, messages=fields["messages"], token_budget=budget
        )
    except RagOptionError as exc:
        raise bad_request(exc.field, str(exc)) from None
    except grpc.aio.AioRpcError as exc:
        # The retrieval service's field names, as the request's `rag` object has them.
        raise from_grpc(exc, {"collection": "rag.collection", "filter": "rag.filter"}) from None
    return list(grounded.messages), list(grounded.citations)


def _chat_message(
    reply: generation_pb2.GenerateResponse, citations: list[Citation]
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = translate.tool_calls(reply.tool_calls)
        message["content"] = reply.text or None
    if citations:
        message["annotations"] = rag.annotations(reply.text, citations)
    return message


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, caller: Authenticated
) -> Response:
    state = gateway(request)
    if body.user:
        request.state.end_user = body.user
    model = await _model(state, caller, body.model)
    messages: list[common_pb2.ChatMessage] | None = None
    citations: list[Citation] = []
    if body.rag is not None:
        messages, citations = await _ground(state, caller, body, model)
    fields = translate.generate_fields(body, model, caller.tenant, messages)
    if body.stream:
        stream = await GenerationStream.open(
            state.clients.generation.stub, generation_pb2.GenerateStreamRequest(**fields)
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            _chat_events(stream, body.model, include_usage, citations, bool(body.logprobs)),
            lambda: state.record_usage(caller, stream.tokens_used()),
        )
    reply = await state.clients.generation.stub.Generate(generation_pb2.GenerateRequest(**fields))
    state.record_usage(caller, reply.usage.total_tokens)
    payload: dict[str, Any] = {
        "id": translate.completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": translate.now(),
        "model": body.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": _chat_message(reply, citations),
                "logprobs": translate.chat_logprobs(reply.logprobs) if body.logprobs else None,
                "finish_reason": translate.FINISH_REASONS.get(reply.finish_reason, "stop"),
            }
        ],
        "usage": translate.usage(reply.usage),
    }
    if body.rag is not None:
        payload["citations"] = rag.citations_payload(citations)
    return JSONResponse(payload)


async def _chat_events(
    stream: GenerationStream,
    model: str,
    include_usage: bool,
    citations: list[Citation],
    logprobs: bool,
) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": translate.completion_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": translate.now(),
        "model": model,
        "system_fingerprint": None,
    }
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, tokens: Any = ()) -> str:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": translate.chat_logprobs(tokens) if tokens else None,
            "finish_reason": finish_reason,
        }
        return event({**base, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    text: list[str] = []
    async for message in _guarded(stream):
        if isinstance(message, str):  # an error after the stream started
            yield message
            return
        if message.delta or (logprobs and message.logprobs):
            text.append(message.delta)
            yield chunk({"content": message.delta}, tokens=message.logprobs)
        if message.tool_calls:
            yield chunk({"tool_calls": translate.tool_call_deltas(message.tool_calls)})
        if message.finish_reason == generation_pb2.FINISH_REASON_ERROR:
            yield _error_event(message.error)
            return
        if message.finish_reason:
            yield chunk({}, translate.FINISH_REASONS.get(message.finish_reason, "stop"))
            if include_usage:
                yield event({**base, "choices": [], "usage": translate.usage(message.usage)})
    if citations:
        answer = "".join(text)
        yield event(
            {
                **base,
                "choices": [],
                "citations": rag.citations_payload(citations),
                "annotations": rag.annotations(answer, citations),
            }
        )
    yield DONE


def _error_event(message: str, code: str = "upstream_error") -> str:
    return event(
        {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    )


async def _guarded(
    stream: GenerationStream,
) -> AsyncIterator[generation_pb2.GenerateStreamResponse | str]:
    """The stream's messages; a gRPC failure mid-stream becomes one error event (in the shape
    the openai SDK raises from) instead of a cut connection."""
    try:
        async for message in stream.messages():
            yield message
    except grpc.aio.AioRpcError as exc:
        error = from_grpc(exc)
        yield _error_event(error.message, error.code or "server_error")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, caller: Authenticated) -> Response:
    state = gateway(request)
    if body.user:
        request.state.end_user = body.user
    model = await _model(state, caller, body.model)
    fields = translate.generate_fields(body, model, caller.tenant)
    if body.stream:
        stream = await GenerationStream.open(
            state.clients.generation.stub, generation_pb2.GenerateStreamRequest(**fields)
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            _completion_events(stream, body.model, include_usage, body.logprobs is not None),
            lambda: state.record_usage(caller, stream.tokens_used()),
        )
    reply = await state.clients.generation.stub.Generate(generation_pb2.GenerateRequest(**fields))
    state.record_usage(caller, reply.usage.total_tokens)
    return JSONResponse(
        {
            "id": translate.completion_id("cmpl"),
            "object": "text_completion",
            "created": translate.now(),
            "model": body.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "text": reply.text,
                    "logprobs": (
                        translate.completion_logprobs(reply.logprobs)
                        if body.logprobs is not None
                        else None
                    ),
                    "finish_reason": translate.FINISH_REASONS.get(reply.finish_reason, "stop"),
                }
            ],
            "usage": translate.usage(reply.usage),
        }
    )


async def _completion_events(
    stream: GenerationStream, model: str, include_usage: bool, logprobs: bool
) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": translate.completion_id("cmpl"),
        "object": "text_completion",
        "created": translate.now(),
        "model": model,
        "system_fingerprint": None,
    }
    extra = {"usage": None} if include_usage else {}
    offset = 0  # where the next token starts in the text, for text_offset
    async for message in _guarded(stream):
        if isinstance(message, str):
            yield message
            return
        if message.finish_reason == generation_pb2.FINISH_REASON_ERROR:
            yield _error_event(message.error)
            return
        finish = (
            translate.FINISH_REASONS.get(message.finish_reason) if message.finish_reason else None
        )
        tokens = message.logprobs if logprobs else []
        if message.delta or finish or tokens:
            choice = {
                "index": 0,
                "text": message.delta,
                "logprobs": translate.completion_logprobs(tokens, offset) if tokens else None,
                "finish_reason": finish,
            }
            offset += sum(len(lp.token) for lp in tokens)
            yield event({**base, "choices": [choice], **extra})
        if finish and include_usage:
            yield event({**base, "choices": [], "usage": translate.usage(message.usage)})
    yield DONE
