"""The generation service as a real gRPC server in front of fake inference servers that
speak TGI's, Ollama's and vLLM's wire formats, with a real Redis for the cache.

Behaviour that is the same for every backend (cache, coalescing, retries, cancellation)
is tested through the vLLM-shaped server; each backend's own wire format is tested in
test_generation_backends.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis
from daert.clients import GenerationClient
from daert.clients.base import field_violations
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, generation_pb2

from tests.fakes.openai import FakeOpenAI
from tests.helpers import free_port
from tests.integration.generation_support import (
    metric,
    models_env,
    request,
    rpc_error,
    user,
)

CHAT = "/v1/chat/completions"
CACHE_DB = 1  # the generation tests' own Redis database: flushed before each test


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["base-model"], enable_lora=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def cache_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{CACHE_DB}"


@pytest.fixture(scope="module")
def generation(vllm: FakeOpenAI, cache_url: str) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "vllm", "backend": "openai", "url": vllm.url, "upstream_model": "base-model",
         "adapters": "direct"},
        {"name": "plain", "backend": "openai", "url": vllm.url, "upstream_model": "base-model",
         "supports_structured_output": False},
        {"name": "dead", "backend": "openai", "url": f"http://127.0.0.1:{free_port()}"},
        {"name": "impatient", "backend": "openai", "url": vllm.url,
         "upstream_model": "base-model", "timeout_s": 0.5},
        redis_url=cache_url,
        retry_backoff_s=0.05,
        max_request_chars=10_000,
        cache_ttl_s=600,
    )  # fmt: skip
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


@pytest.fixture(autouse=True)
def _fresh(vllm: FakeOpenAI, cache_url: str) -> None:
    vllm.reset()
    redis.Redis.from_url(cache_url).flushdb()


@pytest.fixture
async def client(generation: ServerProcess) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, max_attempts=1) as c:
        yield c


async def stream(client: GenerationClient, req: Any, **kwargs: Any) -> list[Any]:
    return [m async for m in client.stub.GenerateStream(req, **kwargs)]


def upstream_calls(fake: FakeOpenAI) -> int:
    return len(fake.requests_to(CHAT))


# A conversation with no user turn: valid, and deterministic requests of it are cached.
NO_USER = [
    common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
    common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="Hi!"),
]


# --- unary and stream ----------------------------------------------------------------------


async def test_generate_returns_text_usage_and_where_it_ran(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    reply = await client.stub.Generate(request("vllm", "hello there"))
    expected = vllm.generation("hello there")
    assert reply.text == expected.text == "Hello, I am a fake model."
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == 2 + expected.completion_tokens
    assert (reply.model, reply.backend, reply.replica) == (
        "vllm", generation_pb2.GENERATION_BACKEND_OPENAI, "vllm"
    )  # fmt: skip
    assert not reply.cached
    assert reply.timings.total.ToNanoseconds() > 0


async def test_stream_deltas_add_up_and_the_ends_carry_metadata(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    messages = await stream(client, request("vllm", "hello there", stream=True))
    assert "".join(m.delta for m in messages) == vllm.expected_text("hello there")
    first, last = messages[0], messages[-1]
    assert first.delta and first.model == "vllm" and first.replica == "vllm"
    assert all(m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert last.usage.completion_tokens == vllm.generation("hello there").completion_tokens
    assert last.backend == generation_pb2.GENERATION_BACKEND_OPENAI
    ttft = last.timings.time_to_first_token.ToNanoseconds()
    assert 0 < ttft <= last.timings.total.ToNanoseconds()


async def test_length_and_stop_sequence_finish_reasons(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    params = generation_pb2.SamplingParams(temperature=0, max_tokens=3)
    reply = await client.stub.Generate(request("vllm", params=params))
    assert (reply.text, reply.finish_reason) == ("Hello, I", generation_pb2.FINISH_REASON_LENGTH)
    params = generation_pb2.SamplingParams(temperature=0, stop=[" fake"])
    messages = await stream(client, request("vllm", stream=True, params=params))
    assert "".join(m.delta for m in messages) == "Hello, I am a"
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE


async def test_sampling_parameters_reach_the_server(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    params = generation_pb2.SamplingParams(
        max_tokens=7, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
        stop=["\n\n"], seed=42,
    )  # fmt: skip
    await client.stub.Generate(request("vllm", params=params))
    body = vllm.requests_to(CHAT)[-1].json
    assert body["model"] == "base-model"
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                 "repetition_penalty", "stop", "seed")} == {
        "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
        "repetition_penalty": 1.1, "stop": ["\n\n"], "seed": 42,
    }  # fmt: skip


async def test_raw_prompt_goes_to_the_completions_api(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    reply = await client.stub.Generate(request("vllm", "Once upon a time", prompt=True))
    assert reply.text == vllm.expected_text("Once upon a time")
    assert vllm.requests_to("/v1/completions")[-1].json["prompt"] == "Once upon a time"
    messages = await stream(client, request("vllm", "Once upon", prompt=True, stream=True))
    assert "".join(m.delta for m in messages) == vllm.expected_text("Once upon")


async def test_structured_output(client: GenerationClient, vllm: FakeOpenAI) -> None:
    schema = '{"type": "object", "properties": {"answer": {"type": "string"}}}'
    fmt = generation_pb2.ResponseFormat(
        type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema
    )
    reply = await client.stub.Generate(request("vllm", response_format=fmt))
    assert reply.text == '{"answer": "Hello"}'
    sent = vllm.requests_to(CHAT)[-1].json["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"]["properties"]["answer"] == {"type": "string"}
    regex = generation_pb2.ResponseFormat(
        type=generation_pb2.RESPONSE_FORMAT_TYPE_REGEX, regex="[0-9]+"
    )
    await client.stub.Generate(request("vllm", response_format=regex))
    assert vllm.requests_to(CHAT)[-1].json["structured_outputs"] == {"regex": "[0-9]+"}
    # A model configured without structured output refuses before any upstream call.
    calls = upstream_calls(vllm)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("plain", response_format=fmt))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert upstream_calls(vllm) == calls


async def test_list_models(client: GenerationClient) -> None:
    reply = await client.stub.ListModels(generation_pb2.GenerationServiceListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert [m.name for m in reply.models] == ["vllm", "plain", "dead", "impatient"]
    assert models["vllm"].is_default and models["vllm"].ready
    assert models["vllm"].supports_adapters and not models["plain"].supports_adapters
    assert not models["plain"].supports_structured_output
    assert not models["dead"].ready
    assert "unreachable" in models["dead"].unavailable_reason
    assert models["vllm"].unavailable_reason == ""


# --- bad input -----------------------------------------------------------------------------

F = generation_pb2.ResponseFormat
R_TEXT = generation_pb2.RESPONSE_FORMAT_TYPE_TEXT
R_JSON_OBJECT = generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT
R_JSON_SCHEMA = generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
R_REGEX = generation_pb2.RESPONSE_FORMAT_TYPE_REGEX
S = generation_pb2.SamplingParams
BAD_INPUT: list[tuple[str, dict[str, Any]]] = [
    ("messages", {"messages": [user("a")], "prompt": "b"}),
    ("messages", {"messages": []}),
    ("messages[0].role", {"messages": [common_pb2.ChatMessage(content="no role")]}),
    ("messages", {"messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="x")]}),
    ("prompt", {"prompt": "   "}),
    ("messages", {"messages": [user("word " * 3000)]}),
    ("params.max_tokens", {"params": S(max_tokens=-1)}),
    ("params.temperature", {"params": S(temperature=-0.5)}),
    ("params.top_p", {"params": S(top_p=0)}),
    ("params.top_p", {"params": S(top_p=1.5)}),
    ("params.top_k", {"params": S(top_k=-1)}),
    ("params.repetition_penalty", {"params": S(repetition_penalty=0)}),
    ("params.stop[1]", {"params": S(stop=["ok", ""])}),
    ("params.stop", {"params": S(stop=[str(i) for i in range(17)])}),
    ("params.seed", {"params": S(seed=-1)}),
    ("response_format.json_schema", {"response_format": F(type=R_JSON_SCHEMA)}),
    (
        "response_format.json_schema",
        {"response_format": F(type=R_JSON_SCHEMA, json_schema="{not json")},
    ),
    (
        "response_format.json_schema",
        {"response_format": F(type=R_JSON_SCHEMA, json_schema="[1, 2]")},
    ),
    ("response_format.json_schema", {"response_format": F(type=R_TEXT, json_schema="{}")}),
    ("response_format.regex", {"response_format": F(type=R_TEXT, regex="a+")}),
    ("response_format.regex", {"response_format": F(type=R_REGEX)}),
    ("response_format.regex", {"response_format": F(type=R_REGEX, regex="(unclosed")}),
    (
        "response_format.type",
        {"response_format": F(type=generation_pb2.ResponseFormatType.ValueType(99))},
    ),
    ("adapter_id", {"model": "plain", "adapter_id": "sql-expert"}),
    ("adapter_id", {"adapter_id": "auto"}),
]


@pytest.mark.parametrize(("field", "fields"), BAD_INPUT, ids=[f for f, _ in BAD_INPUT])
async def test_bad_input_names_the_field(
    client: GenerationClient, vllm: FakeOpenAI, field: str, fields: dict[str, Any]
) -> None:
    fields.setdefault("model", "vllm")
    if "messages" not in fields and "prompt" not in fields:
        fields["messages"] = [user("hello")]
    for cls in (generation_pb2.GenerateRequest, generation_pb2.GenerateStreamRequest):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            if cls is generation_pb2.GenerateRequest:
                await client.stub.Generate(cls(**fields))
            else:
                await stream(client, cls(**fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error.value), error.value.details()
        assert field in (error.value.details() or "")
    assert [r for r in vllm.requests if r.path in vllm.inference_paths] == []


async def test_unknown_model_is_not_found(client: GenerationClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("gpt-17"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "vllm" in (error.value.details() or "")  # names the models there are


# --- upstream failures, retries, cancellation ----------------------------------------------


async def test_refused_connection_is_unavailable_fast(client: GenerationClient) -> None:
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the refusal ended the call before its 30 s
    # deadline, which is what a hang would give instead.
    for call in (client.stub.Generate, lambda r, **kw: stream(client, r, **kw)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request("dead", stream=call is not client.stub.Generate), timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


STATUS_MAPPING = [
    (400, grpc.StatusCode.INVALID_ARGUMENT),
    (413, grpc.StatusCode.INVALID_ARGUMENT),
    (422, grpc.StatusCode.INVALID_ARGUMENT),
    (404, grpc.StatusCode.NOT_FOUND),
    (401, grpc.StatusCode.FAILED_PRECONDITION),
    (403, grpc.StatusCode.FAILED_PRECONDITION),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (500, grpc.StatusCode.UNAVAILABLE),
    (502, grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize(("status", "code"), STATUS_MAPPING)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_upstream_status_mapping(
    client: GenerationClient,
    vllm: FakeOpenAI,
    status: int,
    code: grpc.StatusCode,
    streaming: bool,
) -> None:
    vllm.fail_next_openai(status, f"upstream says {status}", times=5)  # outlasts the retries
    error = await rpc_error(client, request("vllm", stream=streaming))
    assert error.code() == code
    assert f"upstream says {status}" in (error.details() or "")
    # Only 429 and 503 are tried again: RETRY_ATTEMPTS (3) requests in all, then given up.
    assert upstream_calls(vllm) == (3 if status in (429, 503) else 1)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_read_timeout_is_unavailable_at_the_models_timeout(
    client: GenerationClient, vllm: FakeOpenAI, streaming: bool
) -> None:
    # "impatient" waits 0.5 s for the next bytes; the first token would come after 60 s and
    # the call's deadline is 30 s, so only the model's read timeout can end it with this.
    vllm.first_token_delay_s = 60.0
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if streaming:
            await stream(client, request("impatient", stream=True), timeout=30)
        else:
            await client.stub.Generate(request("impatient"), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "timed out (ReadTimeout)" in (error.value.details() or "")
    assert time.monotonic() - started >= 0.5  # it did wait the model's timeout
    assert upstream_calls(vllm) == 1  # the server may have started: not retried


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_shed_requests_are_retried_until_one_succeeds(
    client: GenerationClient, vllm: FakeOpenAI, streaming: bool
) -> None:
    vllm.fail_next_openai(503, "overloaded", err_type="ServiceUnavailableError", times=2)
    if streaming:
        text = "".join(m.delta for m in await stream(client, request("vllm", stream=True)))
    else:
        text = (await client.stub.Generate(request("vllm"))).text
    assert text == vllm.expected_text("hello there")
    assert upstream_calls(vllm) == 3


async def test_no_retry_after_the_first_token(client: GenerationClient, vllm: FakeOpenAI) -> None:
    vllm.disconnect_after_tokens = 3
    messages = await stream(client, request("vllm", stream=True))
    assert "".join(m.delta for m in messages) == "Hello, I"
    last = messages[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_ERROR
    assert "unreachable" in last.error or "closed" in last.error, last.error
    assert upstream_calls(vllm) == 1


async def test_an_error_event_in_a_started_stream_ends_it_with_the_error(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    vllm.error_after_tokens = (2, "CUDA out of memory")
    messages = await stream(client, request("vllm", stream=True))
    assert "".join(m.delta for m in messages) == "Hello,"
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_ERROR
    assert "CUDA out of memory" in messages[-1].error
    assert upstream_calls(vllm) == 1


async def test_cancel_mid_stream_closes_the_upstream(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    # The next token is a minute away, longer than the wait below: a disconnect seen
    # is the service closing the upstream on the cancel, not the stream ending.
    vllm.token_delay_s = 60.0
    call = client.stub.GenerateStream(request("vllm", stream=True))
    first = await call.read()
    assert first.delta == "Hello"
    cancelled_at = time.monotonic()
    call.cancel()
    assert await asyncio.to_thread(vllm.wait_for_disconnects, 1, 30.0)
    assert vllm.last_disconnect_at is not None
    assert vllm.last_disconnect_at >= cancelled_at  # closed because of the cancel


async def test_a_passed_deadline_closes_the_upstream(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    # The first token is a minute away, longer than the waits below: a disconnect seen is
    # the service giving up on the upstream at the deadline, not the answer arriving.
    vllm.first_token_delay_s = 60.0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request("vllm", stream=True), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await asyncio.to_thread(vllm.wait_for_disconnects, 1, 30.0)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("vllm", "another"), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await asyncio.to_thread(vllm.wait_for_disconnects, 2, 30.0)
    assert upstream_calls(vllm) == 2  # both reached the upstream: each was closed


# --- cache -----------------------------------------------------------------------------------


async def test_a_cache_hit_is_identical_and_skips_the_server(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    first = await client.stub.Generate(request("vllm"))
    second = await client.stub.Generate(request("vllm"))
    assert upstream_calls(vllm) == 1
    assert not first.cached and second.cached
    for field in ("text", "finish_reason", "usage", "model", "backend", "replica"):
        assert getattr(first, field) == getattr(second, field), field
    assert second.timings.HasField("time_to_first_token")


async def test_a_cached_answer_is_replayed_as_a_stream(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    original = await stream(client, request("vllm", stream=True))
    replayed = await stream(client, request("vllm", stream=True))
    assert upstream_calls(vllm) == 1
    # The same text, though not in the same pieces: deltas ready at once go out merged.
    assert "".join(m.delta for m in replayed) == "".join(m.delta for m in original)
    assert not original[-1].cached and replayed[-1].cached
    first, last = replayed[0], replayed[-1]
    assert first.delta and (first.model, first.backend, first.replica) == (
        "vllm", generation_pb2.GENERATION_BACKEND_OPENAI, "vllm"
    )  # fmt: skip
    assert (last.model, last.backend, last.replica) == (first.model, first.backend, "vllm")
    assert last.finish_reason == original[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert last.usage == original[-1].usage
    assert not last.delta
    # Stored by a stream, served to a unary call too.
    assert (await client.stub.Generate(request("vllm"))).cached


async def test_cache_policies(client: GenerationClient, vllm: FakeOpenAI) -> None:
    bypass = request("vllm", cache_policy=generation_pb2.CACHE_POLICY_BYPASS)
    assert not (await client.stub.Generate(bypass)).cached
    assert not (await client.stub.Generate(bypass)).cached
    assert upstream_calls(vllm) == 2
    # BYPASS neither read nor wrote: USE misses, then stores.
    assert not (await client.stub.Generate(request("vllm"))).cached
    assert upstream_calls(vllm) == 3
    # REFRESH generates anew and overwrites the entry.
    vllm.reply_tokens = ["A", " fresh", " answer"]
    refresh = request("vllm", cache_policy=generation_pb2.CACHE_POLICY_REFRESH)
    refreshed = await client.stub.Generate(refresh)
    assert (refreshed.text, refreshed.cached) == ("A fresh answer", False)
    assert upstream_calls(vllm) == 4
    hit = await client.stub.Generate(request("vllm"))
    assert (hit.text, hit.cached) == ("A fresh answer", True)


async def test_only_deterministic_requests_are_cached_unless_opted_in(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    sampled = S(temperature=0.8)
    for _ in range(2):
        assert not (await client.stub.Generate(request("vllm", params=sampled))).cached
    assert upstream_calls(vllm) == 2
    seeded = S(temperature=0.8, seed=7)
    assert not (await client.stub.Generate(request("vllm", params=seeded))).cached
    assert (await client.stub.Generate(request("vllm", params=seeded))).cached
    opted = request("vllm", params=sampled, allow_cache_nondeterministic=True)
    assert not (await client.stub.Generate(opted)).cached
    assert (await client.stub.Generate(opted)).cached
    assert upstream_calls(vllm) == 4


async def test_a_conversation_without_a_user_message_is_cached_by_exact_match(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    # Nothing for the semantic cache to compare: only the exact entry applies.
    req = generation_pb2.GenerateRequest(model="vllm", messages=NO_USER, params=S(temperature=0))
    first = await client.stub.Generate(req)
    assert first.text == vllm.expected_text("Be brief. Hi!") and not first.cached
    assert (await client.stub.Generate(req)).cached
    assert upstream_calls(vllm) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"params": S(temperature=0, max_tokens=5)},
        {"params": S(temperature=0, stop=["."])},
        {"tenant": "acme"},
        {"adapter_id": "sql-expert"},
        {"response_format": F(type=R_JSON_OBJECT)},
        {"text": "hello there!"},
    ],
    ids=["max_tokens", "stop", "tenant", "adapter", "response_format", "text"],
)
async def test_the_key_covers_every_field_that_changes_the_answer(
    client: GenerationClient, vllm: FakeOpenAI, change: dict[str, Any]
) -> None:
    vllm.load_adapter("sql-expert", "/adapters/sql")
    await client.stub.Generate(request("vllm"))
    assert not (await client.stub.Generate(request("vllm", **change))).cached
    assert (await client.stub.Generate(request("vllm", **change))).cached
    assert upstream_calls(vllm) == 2


async def test_entries_expire_and_failed_answers_are_not_stored(
    client: GenerationClient, vllm: FakeOpenAI, cache_url: str
) -> None:
    vllm.disconnect_after_tokens = 2
    messages = await stream(client, request("vllm", stream=True))
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_ERROR
    store = redis.Redis.from_url(cache_url)
    assert store.keys("daert:generation:*") == []
    vllm.disconnect_after_tokens = None
    await client.stub.Generate(request("vllm"))
    [key] = store.keys("daert:generation:v1:answer:*")
    assert 590 <= store.ttl(key) <= 600  # cache_ttl_s


async def test_concurrent_identical_requests_reach_the_server_once(
    client: GenerationClient, vllm: FakeOpenAI, generation: ServerProcess
) -> None:
    def coalesced() -> float:
        return metric(generation.metrics_port, "daert_generation_coalesced_total")

    before = coalesced()
    vllm.first_token_delay_s = 0.5
    replies = await asyncio.gather(*(client.stub.Generate(request("vllm")) for _ in range(20)))
    assert upstream_calls(vllm) == 1
    assert {r.text for r in replies} == {vllm.expected_text("hello there")}
    # All 20 arrived within the flight (none was a cache hit): 19 followed the first.
    assert not any(r.cached for r in replies)
    assert coalesced() == before + 19
    streams = await asyncio.gather(
        *(stream(client, request("vllm", "streamed", stream=True)) for _ in range(20))
    )
    assert upstream_calls(vllm) == 2
    assert {"".join(m.delta for m in s) for s in streams} == {vllm.expected_text("streamed")}
    assert not any(s[-1].cached for s in streams)
    assert coalesced() == before + 38


async def test_a_shared_generation_runs_while_any_caller_waits(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    vllm.token_delay_s = 0.1
    leaving = client.stub.GenerateStream(request("vllm", stream=True))
    staying = client.stub.GenerateStream(request("vllm", stream=True))
    assert (await leaving.read()).delta == (await staying.read()).delta == "Hello"
    leaving.cancel()
    rest = [m async for m in staying]
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert "Hello" + "".join(m.delta for m in rest) == vllm.expected_text("hello there")
    assert upstream_calls(vllm) == 1 and vllm.disconnects == 0
    # When every caller has left, the upstream stream is closed.
    a = client.stub.GenerateStream(request("vllm", "again", stream=True))
    b = client.stub.GenerateStream(request("vllm", "again", stream=True))
    await a.read()
    await b.read()
    a.cancel()
    b.cancel()
    assert await asyncio.to_thread(vllm.wait_for_disconnects, 1, 1.0)


async def test_redis_down_still_serves_and_counts_errors(
    client: GenerationClient,
    vllm: FakeOpenAI,
    generation: ServerProcess,
    redis_server: EmbeddedRedis,
) -> None:
    errors = {"service": "generation", "operation": "get"}
    before = metric(generation.metrics_port, "daert_redis_errors_total", **errors)
    redis_server.stop()
    try:
        for _ in range(2):
            reply = await client.stub.Generate(request("vllm"))
            assert reply.text == vllm.expected_text("hello there") and not reply.cached
        messages = await stream(client, request("vllm", stream=True))
        assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
        assert metric(generation.metrics_port, "daert_redis_errors_total", **errors) >= before + 3
        assert generation.health() == "SERVING"
    finally:
        redis_server.start()
    # Back: the cache works again without a restart.
    await client.stub.Generate(request("vllm"))
    assert (await client.stub.Generate(request("vllm"))).cached


# --- LoRA adapters sent directly -----------------------------------------------------------


async def test_a_direct_adapter_is_the_openai_model(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    vllm.load_adapter("sql-expert", "/adapters/sql")
    reply = await client.stub.Generate(request("vllm", adapter_id="sql-expert"))
    assert reply.adapter_id == "sql-expert"
    assert vllm.requests_to(CHAT)[-1].json["model"] == "sql-expert"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("vllm", adapter_id="not-loaded"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# --- health -----------------------------------------------------------------------------------


def test_health_follows_the_default_models_server() -> None:
    port = free_port()
    env = models_env({"name": "m", "backend": "openai", "url": f"http://127.0.0.1:{port}"})
    with ServerProcess("generation", env) as server:
        server.wait_health("NOT_SERVING", 10)
        assert server.health("liveness") == "SERVING"
        with FakeOpenAI(models=["m"], port=port):
            server.wait_health("SERVING", 10)
        server.wait_health("NOT_SERVING", 10)


# --- semantic cache ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semantic(
    vllm: FakeOpenAI, cache_url: str, embedding_server: ServerProcess
) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "vllm", "backend": "openai", "url": vllm.url, "upstream_model": "base-model"},
        redis_url=cache_url,
        semantic_cache="true",
        semantic_cache_threshold=0.95,
    )
    env["DAERT_EMBEDDING_TARGET"] = embedding_server.target
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


async def test_the_semantic_cache_answers_a_paraphrase_in_scope_only(
    semantic: ServerProcess, vllm: FakeOpenAI
) -> None:
    async with GenerationClient(semantic.target, max_attempts=1) as client:
        first = await client.stub.Generate(request("vllm", "How do I reset my password?"))
        assert not first.cached
        # all-MiniLM-L6-v2 cosine 0.985: answered from the cache.
        paraphrase = await client.stub.Generate(request("vllm", "how can I reset my password"))
        assert paraphrase.cached and paraphrase.text == first.text
        assert upstream_calls(vllm) == 1
        # Cosine 0.87 (a different question), another tenant, other parameters: generated.
        for other in (
            request("vllm", "How do I change my password?"),
            request("vllm", "how can I reset my password", tenant="acme"),
            request("vllm", "how can I reset my password", params=S(temperature=0, seed=3)),
        ):
            assert not (await client.stub.Generate(other)).cached
        assert upstream_calls(vllm) == 4
        no_user = generation_pb2.GenerateRequest(
            model="vllm", messages=NO_USER, params=S(temperature=0)
        )
        assert [(await client.stub.Generate(no_user)).cached for _ in range(2)] == [False, True]
        assert upstream_calls(vllm) == 5


def test_without_the_embedding_service_the_semantic_cache_steps_aside(
    vllm: FakeOpenAI, cache_url: str
) -> None:
    env = models_env(
        {"name": "vllm", "backend": "openai", "url": vllm.url, "upstream_model": "base-model"},
        redis_url=cache_url,
        semantic_cache="true",
    )
    env["DAERT_EMBEDDING_TARGET"] = f"127.0.0.1:{free_port()}"

    async def twice() -> list[bool]:
        async with GenerationClient(server.target, max_attempts=1) as client:
            return [(await client.stub.Generate(request("vllm"))).cached for _ in range(2)]

    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        assert asyncio.run(twice()) == [False, True]  # the exact cache still works
        assert metric(server.metrics_port, "daert_generation_semantic_cache_errors_total") >= 1
