"""Tool calling through a real generation server, against each backend's fake: the tools and
the conversation reach the server in its own format, the calls come back unary and streamed
(arguments in pieces) with FINISH_REASON_TOOL_CALLS, tool results go back, cached answers
keep their calls, bad requests name their field, a model without tools says so."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis
from daert.clients import GenerationClient
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, generation_pb2
from google.protobuf import struct_pb2

from tests.fakes.llm import FakeLLMServer
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.integration.generation_support import models_env, request, rpc_error, user

CHAT = "/v1/chat/completions"
TOOLS_DB = 3  # these tests' own Redis database: flushed before each test
WEATHER = {"city": "Paris", "unit": "celsius"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL_CALLS = generation_pb2.FINISH_REASON_TOOL_CALLS


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["base-model"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeOpenAI]:
    """TGI's messages API, where the TGI backend sends requests with tools."""
    with FakeOpenAI(models=["tgi"], flavour="tgi") as fake:
        yield fake


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def fakes(vllm: FakeOpenAI, tgi: FakeOpenAI, ollama: FakeOllama) -> dict[str, FakeLLMServer]:
    return {"vllm": vllm, "tgi": tgi, "ollama": ollama}


@pytest.fixture(scope="module")
def cache_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{TOOLS_DB}"


@pytest.fixture(scope="module")
def generation(
    vllm: FakeOpenAI, tgi: FakeOpenAI, ollama: FakeOllama, cache_url: str
) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "vllm", "backend": "openai", "url": vllm.url, "upstream_model": "base-model"},
        {"name": "tgi", "backend": "tgi", "url": tgi.url},
        {"name": "ollama", "backend": "ollama", "url": ollama.url, "upstream_model": "llama3.2"},
        {"name": "no-tools", "backend": "openai", "url": vllm.url,
         "upstream_model": "base-model", "supports_tools": False},
        redis_url=cache_url,
        retry_backoff_s=0.05,
    )  # fmt: skip
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeLLMServer], cache_url: str) -> None:
    for fake in fakes.values():
        fake.reset()
        fake.tool_calls = [("get_weather", WEATHER)]
    redis.Redis.from_url(cache_url).flushdb()


@pytest.fixture
async def client(generation: ServerProcess) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, max_attempts=1) as c:
        yield c


def weather_tool() -> generation_pb2.Tool:
    parameters = struct_pb2.Struct()
    parameters.update(SCHEMA)
    return generation_pb2.Tool(name="get_weather", description="The weather", parameters=parameters)


def tool_request(model: str, **fields: Any) -> Any:
    fields.setdefault("tools", [weather_tool()])
    return request(model, "weather in Paris?", **fields)


def last_body(fake: FakeLLMServer, path: str) -> dict[str, Any]:
    body = fake.requests_to(path)[-1].json
    assert isinstance(body, dict)
    return body


PATHS = {"vllm": CHAT, "tgi": CHAT, "ollama": "/api/chat"}


@pytest.mark.parametrize("model", ["vllm", "tgi", "ollama"])
async def test_tools_reach_the_server_in_its_format(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    await client.stub.Generate(tool_request(model))
    body = last_body(fakes[model], PATHS[model])
    function = {"name": "get_weather", "description": "The weather", "parameters": SCHEMA}
    assert body["tools"] == [{"type": "function", "function": function}]
    if model != "ollama":  # Ollama has no tool_choice
        assert body["tool_choice"] == "auto"
    else:
        assert "tool_choice" not in body


@pytest.mark.parametrize("model", ["vllm", "tgi", "ollama"])
async def test_calls_come_back_unary(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    response = await client.stub.Generate(tool_request(model))
    assert response.finish_reason == TOOL_CALLS
    [call] = response.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == WEATHER
    assert call.id  # the server's (vLLM, TGI "0") or one derived from the request (Ollama)
    assert response.text == ""
    pieces = fakes[model].tool_argument_pieces
    assert response.usage.completion_tokens == pieces + 1


@pytest.mark.parametrize("model", ["vllm", "tgi", "ollama"])
async def test_calls_come_back_streamed(client: GenerationClient, model: str) -> None:
    messages = [m async for m in client.stub.GenerateStream(tool_request(model, stream=True))]
    deltas = [d for m in messages for d in m.tool_calls]
    assert deltas[0].id and deltas[0].name == "get_weather" and deltas[0].index == 0
    assert all(not d.id and not d.name for d in deltas[1:])
    assert json.loads("".join(d.arguments_delta for d in deltas)) == WEATHER
    if model != "ollama":  # Ollama sends each call whole; the others in pieces
        assert len(deltas) > 2
    assert messages[-1].finish_reason == TOOL_CALLS
    assert messages[0].model == model  # the first message says where it runs


async def test_two_calls_and_the_unary_and_streamed_ids_agree_on_ollama(
    client: GenerationClient, ollama: FakeOllama
) -> None:
    ollama.tool_calls = [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]
    unary = await client.stub.Generate(tool_request("ollama"))
    streamed = [
        d
        for m in [m async for m in client.stub.GenerateStream(tool_request("ollama", stream=True))]
        for d in m.tool_calls
    ]
    assert [(c.name, json.loads(c.arguments)) for c in unary.tool_calls] == [
        ("get_weather", WEATHER),
        ("get_time", {"zone": "CET"}),
    ]
    assert [d.index for d in streamed] == [0, 1]
    assert [d.id for d in streamed] == [c.id for c in unary.tool_calls]
    assert len({c.id for c in unary.tool_calls}) == 2


def tool_turns() -> list[common_pb2.ChatMessage]:
    call = common_pb2.ToolCall(id="call_1", name="get_weather", arguments=json.dumps(WEATHER))
    return [
        user("weather in Paris?"),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="18C", tool_call_id="call_1"),
    ]


@pytest.mark.parametrize("model", ["vllm", "tgi", "ollama"])
async def test_tool_results_go_back(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fakes[model].tool_calls = None  # the model answers with text once it has the result
    response = await client.stub.Generate(
        generation_pb2.GenerateRequest(model=model, messages=tool_turns(), tools=[weather_tool()])
    )
    assert response.finish_reason == generation_pb2.FINISH_REASON_STOP and response.text
    assistant, result = last_body(fakes[model], PATHS[model])["messages"][1:]
    if model == "ollama":
        assert assistant["tool_calls"] == [
            {"function": {"name": "get_weather", "arguments": WEATHER}}
        ]
        assert result == {"role": "tool", "content": "18C", "tool_name": "get_weather"}
    else:
        assert assistant["tool_calls"] == [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(WEATHER)},
            }
        ]
        assert result == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


async def test_cached_answers_keep_their_calls(client: GenerationClient, vllm: FakeOpenAI) -> None:
    first = await client.stub.Generate(tool_request("vllm"))
    again = await client.stub.Generate(tool_request("vllm"))
    assert again.cached and list(again.tool_calls) == list(first.tool_calls)
    assert again.finish_reason == TOOL_CALLS
    replayed = [m async for m in client.stub.GenerateStream(tool_request("vllm", stream=True))]
    assert replayed[-1].cached and replayed[-1].finish_reason == TOOL_CALLS
    assert [(d.id, d.name, d.arguments_delta) for m in replayed for d in m.tool_calls] == [
        (c.id, c.name, c.arguments) for c in first.tool_calls
    ]
    # Another tool choice is another answer.
    none = generation_pb2.ToolChoice(mode=generation_pb2.TOOL_CHOICE_MODE_NONE)
    text = await client.stub.Generate(tool_request("vllm", tool_choice=none))
    assert not text.cached and not text.tool_calls and text.text
    assert len(vllm.requests_to(CHAT)) == 2  # the streamed replay came from the cache


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_bad_requests_name_their_field(client: GenerationClient, stream: bool) -> None:
    duplicate = tool_request("vllm", stream=stream, tools=[weather_tool(), weather_tool()])
    error = await rpc_error(client, duplicate)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tools[1].name" in (error.details() or "")
    turns = tool_turns()
    turns[2].ClearField("tool_call_id")
    cls = generation_pb2.GenerateStreamRequest if stream else generation_pb2.GenerateRequest
    error = await rpc_error(client, cls(model="vllm", messages=turns))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[2].tool_call_id" in (error.details() or "")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_model_without_tools_or_a_choice_it_cannot_honour_is_a_precondition(
    client: GenerationClient, vllm: FakeOpenAI, stream: bool
) -> None:
    error = await rpc_error(client, tool_request("no-tools", stream=stream))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not support tools" in (error.details() or "")
    required = generation_pb2.ToolChoice(mode=generation_pb2.TOOL_CHOICE_MODE_REQUIRED)
    error = await rpc_error(client, tool_request("ollama", stream=stream, tool_choice=required))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tool_choice" in (error.details() or "")
    assert vllm.requests_to(CHAT) == []


async def test_list_models_says_which_take_tools(client: GenerationClient) -> None:
    models = {m.name: m for m in (await client.stub.ListModels(
        generation_pb2.GenerationServiceListModelsRequest())).models}  # fmt: skip
    assert models["vllm"].supports_tools and not models["no-tools"].supports_tools
