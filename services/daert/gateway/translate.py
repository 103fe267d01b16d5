"""OpenAI request bodies to the generation contract, and the contract's answers back to
OpenAI's shapes: the one place that knows both."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from google.protobuf import struct_pb2

from daert.gateway.catalog import CatalogModel
from daert.gateway.errors import bad_request
from daert.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    ToolDefinition,
)
from daert.v1 import common_pb2, generation_pb2

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}

FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    generation_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    # A stream stopped by a server drain ends like a normal answer, cut short.
    generation_pb2.FINISH_REASON_CANCELLED: "length",
}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(message: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "total_tokens": message.total_tokens or message.prompt_tokens + message.completion_tokens,
    }


def _reject_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """OpenAI parameters the generation contract has no equivalent for: a 400 naming each
    rather than an answer produced without it."""
    if body.n != 1:
        raise bad_request("n", "only n=1 is supported: send one request per choice")
    if body.presence_penalty:
        raise bad_request("presence_penalty", "not supported; use repetition_penalty")
    if body.frequency_penalty:
        raise bad_request("frequency_penalty", "not supported; use repetition_penalty")
    if body.logit_bias:
        raise bad_request("logit_bias", "not supported")


def _params(body: ChatCompletionRequest | CompletionRequest) -> generation_pb2.SamplingParams:
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest):
        max_tokens = body.max_completion_tokens or body.max_tokens
    params = generation_pb2.SamplingParams(max_tokens=max_tokens or 0, top_k=body.top_k or 0)
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise bad_request("stop", "at most 4 stop sequences")
    params.stop.extend(stop)
    return params


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for n, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{index}].content[{n}]",
                f"content parts of type {part.type!r} are not supported: only text",
            )
        parts.append(part.text)
    return "".join(parts)


def _message(message: ChatMessage, index: int) -> common_pb2.ChatMessage:
    converted = common_pb2.ChatMessage(
        role=_ROLES[message.role],
        content=_text(message, index),
        name=message.name or "",
        tool_call_id=message.tool_call_id or "",
    )
    for call in message.tool_calls or ():
        converted.tool_calls.add(
            id=call.id, name=call.function.name, arguments=call.function.arguments
        )
    return converted


def _response_format(fmt: ResponseFormat | None) -> generation_pb2.ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return generation_pb2.ResponseFormat(type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request("response_format.json_schema", "json_schema.schema is required")
    return generation_pb2.ResponseFormat(
        type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=json.dumps(fmt.json_schema.schema_),
        schema_name=fmt.json_schema.name,
    )


def _tool(tool: ToolDefinition) -> generation_pb2.Tool:
    converted = generation_pb2.Tool(
        name=tool.function.name,
        description=tool.function.description,
        strict=bool(tool.function.strict),
    )
    if tool.function.parameters is not None:
        parameters = struct_pb2.Struct()
        parameters.update(tool.function.parameters)
        converted.parameters.CopyFrom(parameters)
    return converted


def _tool_choice(body: ChatCompletionRequest) -> generation_pb2.ToolChoice | None:
    choice = body.tool_choice
    if choice is None:
        return None
    if not isinstance(choice, str):
        return generation_pb2.ToolChoice(
            mode=generation_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=choice.function.name
        )
    modes = {
        "auto": generation_pb2.TOOL_CHOICE_MODE_AUTO,
        "none": generation_pb2.TOOL_CHOICE_MODE_NONE,
        "required": generation_pb2.TOOL_CHOICE_MODE_REQUIRED,
    }
    return generation_pb2.ToolChoice(mode=modes[choice])


def generate_fields(
    body: ChatCompletionRequest | CompletionRequest,
    model: CatalogModel,
    tenant: str,
    messages: list[common_pb2.ChatMessage] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for GenerateRequest and GenerateStreamRequest alike (the two are
    field-for-field identical). `messages` replaces the body's (a RAG-grounded conversation)."""
    _reject_unsupported(body)
    fields: dict[str, Any] = {
        "model": model.generation_model,
        "adapter_id": model.adapter_id,
        "params": _params(body),
        "tenant": tenant,
    }
    if isinstance(body, CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise bad_request("prompt", "exactly one prompt per request")
        if body.echo:
            raise bad_request("echo", "not supported")
        if body.suffix:
            raise bad_request("suffix", "not supported")
        if body.best_of not in (None, 1):
            raise bad_request("best_of", "only best_of=1 is supported")
        fields["prompt"] = prompts[0]
        if body.logprobs is not None:
            fields |= {"logprobs": True, "top_logprobs": body.logprobs}
        return fields
    fields["messages"] = messages or [_message(m, i) for i, m in enumerate(body.messages)]
    response_format = _response_format(body.response_format)
    if response_format is not None:
        fields["response_format"] = response_format
    if body.tools:
        fields["tools"] = [_tool(t) for t in body.tools]
    tool_choice = _tool_choice(body)
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    fields["logprobs"] = bool(body.logprobs)
    fields["top_logprobs"] = body.top_logprobs or 0
    return fields


def tool_calls(calls: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]


def tool_call_deltas(deltas: Any) -> list[dict[str, Any]]:
    """Streamed tool calls in OpenAI's delta shape: id, type and name only on a call's first
    delta, the arguments in pieces."""
    out = []
    for delta in deltas:
        entry: dict[str, Any] = {"index": delta.index, "function": {}}
        if delta.id:
            entry["id"] = delta.id
            entry["type"] = "function"
        if delta.name:
            entry["function"]["name"] = delta.name
        if delta.arguments_delta:
            entry["function"]["arguments"] = delta.arguments_delta
        out.append(entry)
    return out


def _entry(token: str, logprob: float) -> dict[str, Any]:
    # OpenAI's bytes are the token's UTF-8 encoding, as a list of byte values.
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(logprobs: Any) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`: `{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}`."""
    return {
        "content": [
            {
                **_entry(lp.token, lp.logprob),
                "top_logprobs": [_entry(top.token, top.logprob) for top in lp.top_logprobs],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs(logprobs: Any, offset: int = 0) -> dict[str, Any]:
    """A text completion's `logprobs`: parallel lists, each token's alternatives as a
    {token: logprob} map, and where each token starts in the text (from `offset`)."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{top.token: top.logprob for top in lp.top_logprobs} for lp in logprobs],
        "text_offset": offsets,
    }
