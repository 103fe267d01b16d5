"""Tool calling in the generation service: validation of the request's tools, messages and
tool choice, and the translation to and from each server's wire format."""

from __future__ import annotations

import json
from typing import Any

import pytest
from daert.generation.backends.base import UpstreamCall
from daert.generation.backends.ollama import OllamaBackend
from daert.generation.backends.openai import _request as openai_request
from daert.generation.backends.wire import ToolCallStream, synthetic_call_id, tool_calls
from daert.generation.cache import cache_key
from daert.generation.config import ModelConfig
from daert.generation.request import (
    ToolCall,
    ToolCallDelta,
    assemble_tool_calls,
    parse_input,
)
from daert.runtime.errors import InvalidArgument
from daert.v1 import common_pb2, generation_pb2
from google.protobuf import struct_pb2

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def weather_tool(name: str = "get_weather") -> generation_pb2.Tool:
    parameters = struct_pb2.Struct()
    parameters.update(SCHEMA)
    return generation_pb2.Tool(name=name, description="The weather", parameters=parameters)


def conversation() -> list[common_pb2.ChatMessage]:
    call = common_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    return [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="weather in Paris?"),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="18C", tool_call_id="call_1"),
    ]


def parsed(**fields: Any) -> Any:
    fields.setdefault("messages", conversation())
    return parse_input(generation_pb2.GenerateRequest(**fields), 100_000)


def field_of(**fields: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parsed(**fields)
    return caught.value.field


def test_a_tool_conversation_parses() -> None:
    request = parsed(
        tools=[weather_tool()],
        tool_choice=generation_pb2.ToolChoice(
            mode=generation_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="get_weather"
        ),
    )
    assert request.tools[0].parameters == SCHEMA
    assert request.tool_choice.kind == "function" and request.uses_tools
    assert request.messages[1].tool_calls == (
        ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
    )
    assert request.messages[2].tool_call_id == "call_1"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": [weather_tool("bad name")]}, "tools[0].name"),
        ({"tools": [weather_tool("x" * 65)]}, "tools[0].name"),
        ({"tools": [weather_tool(), weather_tool()]}, "tools[1].name"),
        (
            {
                "tool_choice": generation_pb2.ToolChoice(
                    mode=generation_pb2.TOOL_CHOICE_MODE_REQUIRED
                )
            },
            "tool_choice.mode",
        ),
        (
            {
                "tools": [weather_tool()],
                "tool_choice": generation_pb2.ToolChoice(
                    mode=generation_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="other"
                ),
            },
            "tool_choice.function_name",
        ),
        (
            {
                "tools": [weather_tool()],
                "tool_choice": generation_pb2.ToolChoice(function_name="get_weather"),
            },
            "tool_choice.function_name",
        ),
        ({"tools": [weather_tool()], "messages": [], "prompt": "hi"}, "tools"),
    ],
)
def test_bad_tools_name_their_field(fields: dict[str, Any], field: str) -> None:
    assert field_of(**fields) == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m[2].ClearField("tool_call_id"), "messages[2].tool_call_id"),
        (lambda m: setattr(m[0], "tool_call_id", "x"), "messages[0].tool_call_id"),
        (lambda m: m[0].tool_calls.add(id="a", name="f", arguments="{}"), "messages[0].tool_calls"),
        (lambda m: setattr(m[1].tool_calls[0], "id", ""), "messages[1].tool_calls[0].id"),
        (lambda m: setattr(m[1].tool_calls[0], "name", ""), "messages[1].tool_calls[0].name"),
        (
            lambda m: setattr(m[1].tool_calls[0], "arguments", "{city"),
            "messages[1].tool_calls[0].arguments",
        ),
        (
            lambda m: setattr(m[1].tool_calls[0], "arguments", "[1]"),
            "messages[1].tool_calls[0].arguments",
        ),
    ],
)
def test_bad_tool_messages_name_their_field(change: Any, field: str) -> None:
    messages = conversation()
    change(messages)
    assert field_of(messages=messages) == field


def test_the_cache_key_covers_tools_and_keeps_old_keys() -> None:
    plain = parse_input(
        generation_pb2.GenerateRequest(messages=conversation()[:1]), 100_000
    ).canonical()
    assert "tools" not in plain and plain["messages"] == [["user", "weather in Paris?", ""]]
    auto = parsed(tools=[weather_tool()]).canonical()
    none = parsed(
        tools=[weather_tool()],
        tool_choice=generation_pb2.ToolChoice(mode=generation_pb2.TOOL_CHOICE_MODE_NONE),
    ).canonical()
    assert auto != none and auto["tools"][0]["parameters"] == SCHEMA


def test_openai_wire_format() -> None:
    request = parsed(tools=[weather_tool()])
    path, body = openai_request(UpstreamCall(request, "m"), stream=False)
    assert path == "/v1/chat/completions"
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "The weather", "parameters": SCHEMA},
        }
    ]
    assert body["tool_choice"] == "auto"
    assert body["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert body["messages"][2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


def test_ollama_wire_format() -> None:
    backend = OllamaBackend(ModelConfig(name="llama3.2"))
    _, body = backend._request(UpstreamCall(parsed(tools=[weather_tool()]), "m"), stream=True)
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert body["messages"][2] == {"role": "tool", "content": "18C", "tool_name": "get_weather"}
    none = generation_pb2.ToolChoice(mode=generation_pb2.TOOL_CHOICE_MODE_NONE)
    _, body = backend._request(
        UpstreamCall(parsed(tools=[weather_tool()], tool_choice=none), "m"), stream=True
    )
    assert "tools" not in body
    required = generation_pb2.ToolChoice(mode=generation_pb2.TOOL_CHOICE_MODE_REQUIRED)
    reason = backend.unsupported(parsed(tools=[weather_tool()], tool_choice=required))
    assert reason is not None and "tool_choice" in reason


def test_calls_read_from_each_spelling() -> None:
    request = parsed(tools=[weather_tool()])
    # OpenAI: text arguments with ids; Ollama: object arguments, no id; TGI 2.x: one object.
    assert tool_calls(
        [{"id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}], request
    ) == (ToolCall("c", "f", '{"a": 1}'),)
    [ollama] = tool_calls([{"function": {"name": "f", "arguments": {"a": 1}}}], request)
    assert json.loads(ollama.arguments) == {"a": 1}
    assert ollama.id == synthetic_call_id(request, 0) and ollama.id.startswith("call_")
    assert tool_calls({"id": "", "function": {"name": "f", "arguments": {}}}, request)[0].id
    assert synthetic_call_id(request, 1) != ollama.id
    assert synthetic_call_id(parsed(), 0) != ollama.id  # another request, another id


def test_streamed_pieces_assemble() -> None:
    request = parsed(tools=[weather_tool()])
    stream = ToolCallStream(request)
    deltas = stream.feed([{"index": 0, "id": "", "function": {"name": "f", "arguments": ""}}])
    deltas += stream.feed([{"index": 0, "function": {"name": None, "arguments": '{"a"'}}])
    deltas += stream.feed([{"index": 0, "function": {"arguments": ": 1}"}}])
    assert deltas[0] == ToolCallDelta(0, synthetic_call_id(request, 0), "f", "")
    assert [d.id for d in deltas[1:]] == ["", ""]
    assert assemble_tool_calls(deltas) == (
        ToolCall(synthetic_call_id(request, 0), "f", '{"a": 1}'),
    )


def test_a_tool_result_is_never_a_semantic_hit_for_the_call_before() -> None:
    question = parse_input(
        generation_pb2.GenerateRequest(messages=conversation()[:1], tools=[weather_tool()]),
        100_000,
    )
    answered = parsed(tools=[weather_tool()])
    first = cache_key("openai", "m", "", "", question)
    then = cache_key("openai", "m", "", "", answered)
    assert first.text == then.text  # the same last user message...
    assert first.scope != then.scope  # ...but the call and its result are in the scope
