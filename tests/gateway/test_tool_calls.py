"""Tool calling through the gateway with the openai SDK, in both directions: the model's
calls come back (unary and streamed in pieces) with finish reason `tool_calls`, and the
application's results go back to the model as `role: tool` messages."""

from __future__ import annotations

import json

import openai
import pytest
from daert.testing import ServerProcess

from tests.fakes.openai import FakeOpenAI
from tests.gateway.conftest import CHAT_MODEL, NO_TOOLS_MODEL

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def client(gateway_server: ServerProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=api_key, max_retries=0)


def test_the_models_tool_call_comes_back(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    fake_vllm.tool_calls = [("get_weather", {"city": "Oslo"})]
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    sent = fake_vllm.requests_to(CHAT)[-1].json
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == "auto"


def test_streamed_tool_call_deltas_assemble(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    fake_vllm.tool_calls = [("get_weather", {"city": "Oslo"})]
    fake_vllm.tool_argument_pieces = 3
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER_TOOL], stream=True
    )
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) >= 3  # the arguments arrive in pieces, as the LLM server sent them
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert all(d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {"city": "Oslo"}


def test_tool_results_go_back_to_the_model(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees and rain"},
    ]
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=conversation, tools=[WEATHER_TOOL]
    )
    assert reply.choices[0].finish_reason == "stop"
    sent = fake_vllm.requests_to(CHAT)[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees and rain"}


def test_named_tool_choice_and_bad_tools(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    fake_vllm.tool_calls = [("get_weather", {"city": "Oslo"})]
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    # Refused by the generation service, named in OpenAI's terms.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=ASK,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
        )
    assert caught.value.response.json()["error"]["param"].startswith("tool_choice")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "tool", "content": "orphan result"}]
        )
    assert caught.value.response.json()["error"]["param"].startswith("messages[0]")


def test_a_model_without_tools_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NO_TOOLS_MODEL, messages=ASK, tools=[WEATHER_TOOL])
    error = caught.value.response.json()["error"]
    assert error["code"] == "unsupported" and "tool" in error["message"]
