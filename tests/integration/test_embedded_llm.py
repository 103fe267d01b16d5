"""The stack over a real LLM: llama.cpp's llama-server with Gemma 3 270M (the embedded LLM of
`make up`), behind the real generation service, and the context service counting with the
server's own tokenizer. Kept few and small: the model is a base model on two CPU cores;
wire formats and faults are the fakes' job (test_generation_backends.py,
test_llama_cpp_fake_fidelity.py)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import jsonschema
import pytest
from daert.clients import ContextClient, GenerationClient
from daert.local.llm import MODEL_NAME, EmbeddedLlm, context_tokenizers, generation_models
from daert.runtime.polling import poll_while
from daert.testing import ServerProcess
from daert.v1 import common_pb2, context_pb2, generation_pb2
from google.protobuf import struct_pb2

from tests.integration.context_support import compress, conversation, msg
from tests.integration.generation_support import request


@pytest.fixture(scope="module")
def generation(llm_server: EmbeddedLlm) -> Iterator[ServerProcess]:
    env = {"DAERT_GENERATION_MODELS": generation_models(llm_server.url, 1024)}
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="module")
def context_server(
    llm_server: EmbeddedLlm, generation: ServerProcess, embedding_server: ServerProcess
) -> Iterator[ServerProcess]:
    env = {
        "DAERT_CONTEXT_TOKENIZERS": context_tokenizers(llm_server.url),
        "DAERT_GENERATION_TARGET": generation.target,
        "DAERT_EMBEDDING_TARGET": embedding_server.target,
    }
    with ServerProcess("context", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture
async def client(generation: ServerProcess) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, timeout_s=120) as client:
        yield client


def tokens_predicted(llm: EmbeddedLlm) -> float:
    with urllib.request.urlopen(f"{llm.url}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("llamacpp:tokens_predicted_total "):
                return float(line.split()[1])
    raise AssertionError("llama-server /metrics has no llamacpp:tokens_predicted_total")


def slots_busy(llm: EmbeddedLlm) -> int:
    with urllib.request.urlopen(f"{llm.url}/slots", timeout=5) as reply:
        return sum(bool(slot["is_processing"]) for slot in json.load(reply))


async def test_generate_returns_text_usage_and_a_finish_reason(client: GenerationClient) -> None:
    params = generation_pb2.SamplingParams(temperature=0, max_tokens=12)
    reply = await client.stub.Generate(
        request(MODEL_NAME, "The capital of France is", params=params)
    )
    assert reply.text.strip()
    assert reply.model == MODEL_NAME and reply.backend == generation_pb2.GENERATION_BACKEND_OPENAI
    assert reply.finish_reason in (
        generation_pb2.FINISH_REASON_LENGTH,
        generation_pb2.FINISH_REASON_STOP,
    )
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_generate_stream_delivers_the_answer_in_pieces(client: GenerationClient) -> None:
    params = generation_pb2.SamplingParams(temperature=0, max_tokens=12)
    stream = request(MODEL_NAME, "Once upon a time", stream=True, params=params)
    messages = [m async for m in client.stub.GenerateStream(stream)]
    assert len([m for m in messages if m.delta]) > 1
    assert "".join(m.delta for m in messages).strip()
    last = messages[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12
    assert last.timings.time_to_first_token.ToTimedelta().total_seconds() > 0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_llama_server_takes_tools(client: GenerationClient, stream: bool) -> None:
    # Whether a 270M base model calls the tool is beside the point: the request with tools
    # and the conversation with a tool call and its result go through (--jinja).
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    tool = generation_pb2.Tool(name="get_weather", description="The weather", parameters=parameters)
    call = common_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    messages = [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Weather in Paris?"),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="18C", tool_call_id="call_1"),
    ]
    params = generation_pb2.SamplingParams(temperature=0, max_tokens=8)
    cls = generation_pb2.GenerateStreamRequest if stream else generation_pb2.GenerateRequest
    for turns in (messages[:1], messages):
        req = cls(model=MODEL_NAME, messages=turns, tools=[tool], params=params)
        if stream:
            replies = [m async for m in client.stub.GenerateStream(req)]
            reason = replies[-1].finish_reason
        else:
            reason = (await client.stub.Generate(req)).finish_reason
        assert reason in (
            generation_pb2.FINISH_REASON_STOP,
            generation_pb2.FINISH_REASON_LENGTH,
            generation_pb2.FINISH_REASON_TOOL_CALLS,
        )


@pytest.mark.parametrize("raw_prompt", [False, True], ids=["messages", "prompt"])
async def test_a_json_schema_response_format_yields_json_that_validates(
    client: GenerationClient, raw_prompt: bool
) -> None:
    # A raw prompt goes to /v1/completions, which llama.cpp constrains only by a top-level
    # json_schema (it ignores response_format and vLLM's structured_outputs there).
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer"},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    reply = await client.stub.Generate(
        request(
            MODEL_NAME,
            "Give the largest city of Portugal as JSON.",
            prompt=raw_prompt,
            params=generation_pb2.SamplingParams(temperature=0, max_tokens=60),
            response_format=generation_pb2.ResponseFormat(
                type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)
            ),
        )
    )
    jsonschema.validate(json.loads(reply.text), schema)


async def test_repetition_penalty_reaches_llama_cpp(client: GenerationClient) -> None:
    """llama.cpp calls it repeat_penalty; ignored, both greedy answers would be the same."""

    async def answer(penalty: float) -> str:
        params = generation_pb2.SamplingParams(
            temperature=0, max_tokens=48, repetition_penalty=penalty
        )
        reply = await client.stub.Generate(
            request(MODEL_NAME, "one one one one one", params=params)
        )
        return reply.text

    await answer(1.0)  # greedy answers repeat once the prompt is in the server's cache
    plain = await answer(1.0)
    assert await answer(1.9) != plain
    assert await answer(1.0) == plain  # the difference was the penalty, not chance


async def test_cancelling_a_stream_frees_the_servers_slot(
    client: GenerationClient, llm_server: EmbeddedLlm
) -> None:
    predicted_before = tokens_predicted(llm_server)
    params = generation_pb2.SamplingParams(temperature=0, max_tokens=900)
    call = client.stub.GenerateStream(
        request(MODEL_NAME, "Count to a thousand:", stream=True, params=params)
    )
    received = 0
    async for message in call:
        received += bool(message.delta)
        if received >= 3:
            break
    assert slots_busy(llm_server) == 1
    call.cancel()
    # The server stops decoding once the relayed HTTP stream is closed; wait for the slot,
    # however slow the machine, then check it stopped long before its 900 tokens.
    give_up = time.monotonic() + 120

    async def busy() -> int:
        return await asyncio.to_thread(slots_busy, llm_server)

    assert await poll_while(busy, 1, lambda: give_up, 0.05, 0.5) == 0
    assert tokens_predicted(llm_server) - predicted_before < 300


# --- the context service counting with the model's own server --------------------------------


async def test_count_tokens_equals_the_prompt_tokens_the_model_reads(
    context_server: ServerProcess, client: GenerationClient
) -> None:
    messages = [
        msg("system", "You are a terse assistant. Reply in one word."),
        msg("user", "Héllo! What's 2+2? 日本語 too."),
        msg("assistant", "Four."),
        msg("user", "And 3+3?"),
    ]
    async with ContextClient(context_server.target) as context:
        counted = await context.stub.CountTokens(context_pb2.CountTokensRequest(messages=messages))
    assert counted.tokenizer == MODEL_NAME
    assert sum(counted.message_tokens) < counted.tokens
    reply = await client.stub.Generate(
        generation_pb2.GenerateRequest(
            model=MODEL_NAME,
            messages=messages,
            params=generation_pb2.SamplingParams(temperature=0, max_tokens=1),
        )
    )
    assert counted.tokens == reply.usage.prompt_tokens


async def test_compress_with_summaries_written_by_the_embedded_model(
    context_server: ServerProcess,
) -> None:
    messages = conversation(40)
    async with ContextClient(context_server.target, timeout_s=300) as context:
        reply = await context.stub.Compress(
            compress(messages, 300, strategy=context_pb2.COMPRESSION_STRATEGY_ABSTRACTIVE,
                     summary_max_tokens=48, keep_last_messages=4)
        )  # fmt: skip
        assert reply.strategy_used == context_pb2.COMPRESSION_STRATEGY_ABSTRACTIVE
        assert reply.summary.strip() and reply.usage.completion_tokens > 0
        assert reply.tokens_after <= 300
        recount = await context.stub.CountTokens(
            context_pb2.CountTokensRequest(messages=reply.messages)
        )
        assert recount.tokens == reply.tokens_after
        assert reply.messages[0] == messages[0]
        assert list(reply.messages[-4:]) == messages[-4:]
        assert reply.messages[1].role == common_pb2.ROLE_SYSTEM
