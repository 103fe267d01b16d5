"""Each backend's wire format, through a real generation server: TGI's native API (both SSE
framings), Ollama's /api/chat and /api/generate, the OpenAI-compatible API as vLLM, TGI's
messages API and llama.cpp speak it, and what every backend shares (stream cancellation, a
dropped connection, a body that is not JSON) run against each fake."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from daert.clients import GenerationClient
from daert.testing import ServerProcess
from daert.v1 import generation_pb2

from tests.fakes.llm import FakeLLMServer
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.tgi import FakeTGI
from tests.integration.generation_support import (
    CHAT_TEMPLATE,
    assert_ended_by_error,
    models_env,
    render_chat,
    request,
    rpc_error,
)

S = generation_pb2.SamplingParams
F = generation_pb2.ResponseFormat
R_JSON_OBJECT = generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT
R_REGEX = generation_pb2.RESPONSE_FORMAT_TYPE_REGEX
TGI_STREAM, TGI_UNARY = "/generate_stream", "/generate"


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi_spaced() -> Iterator[FakeTGI]:
    with FakeTGI(sse_space=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["base-model"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi_messages() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["tgi-model"], flavour="tgi") as fake:
        yield fake


@pytest.fixture(scope="module")
def llama_cpp() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["llama"], flavour="llama.cpp") as fake:
        yield fake


@pytest.fixture(scope="module")
def llama_cpp_legacy() -> Iterator[FakeOpenAI]:
    """A llama.cpp server from before PR #16486: errors in a stream as an `error:` field."""
    with FakeOpenAI(models=["llama"], flavour="llama.cpp", legacy_errors=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def fakes(
    tgi: FakeTGI,
    tgi_spaced: FakeTGI,
    ollama: FakeOllama,
    vllm: FakeOpenAI,
    tgi_messages: FakeOpenAI,
    llama_cpp: FakeOpenAI,
    llama_cpp_legacy: FakeOpenAI,
) -> dict[str, FakeLLMServer]:
    return {"tgi": tgi, "tgi-spaced": tgi_spaced, "ollama": ollama, "vllm": vllm,
            "tgi-messages": tgi_messages, "llama.cpp": llama_cpp,
            "llama.cpp-legacy": llama_cpp_legacy}  # fmt: skip


@pytest.fixture(scope="module")
def generation(fakes: dict[str, FakeLLMServer]) -> Iterator[ServerProcess]:
    url = {name: fake.url for name, fake in fakes.items()}
    env = models_env(
        {"name": "tgi", "backend": "tgi", "url": url["tgi"], "chat_template": CHAT_TEMPLATE,
         "adapters": "direct"},
        {"name": "tgi-spaced", "backend": "tgi", "url": url["tgi-spaced"],
         "chat_template": CHAT_TEMPLATE},
        {"name": "tgi-raw", "backend": "tgi", "url": url["tgi"]},
        {"name": "ollama", "backend": "ollama", "url": url["ollama"], "upstream_model": "llama3.2",
         "keep_alive": "10m"},
        {"name": "ollama-unpulled", "backend": "ollama", "url": url["ollama"],
         "upstream_model": "mistral"},
        {"name": "vllm", "backend": "openai", "url": url["vllm"], "upstream_model": "base-model"},
        {"name": "tgi-messages", "backend": "openai", "url": url["tgi-messages"],
         "upstream_model": "tgi-model"},
        {"name": "llama.cpp", "backend": "openai", "url": url["llama.cpp"],
         "upstream_model": "llama"},
        {"name": "llama.cpp-legacy", "backend": "openai", "url": url["llama.cpp-legacy"],
         "upstream_model": "llama"},
        retry_backoff_s=0.05,
    )  # fmt: skip
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeLLMServer]) -> None:
    for fake in fakes.values():
        fake.reset()


@pytest.fixture
async def client(generation: ServerProcess) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, max_attempts=1) as c:
        yield c


async def stream(client: GenerationClient, req: Any) -> list[Any]:
    return [m async for m in client.stub.GenerateStream(req)]


def chat_prompt(text: str = "hello there") -> str:
    return render_chat([("user", text)])


# --- TGI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tgi", "tgi-spaced"], ids=["data:", "data: "])
async def test_tgi_chat_unary_and_stream(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    assert isinstance(fake, FakeTGI)
    expected = fake.generation(chat_prompt())
    reply = await client.stub.Generate(request(model))
    assert reply.text == expected.text == "Hello, I am a fake model."
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP  # eos_token
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.backend == generation_pb2.GENERATION_BACKEND_TGI
    body = fake.requests_to(TGI_UNARY)[-1].json
    assert body["inputs"] == chat_prompt()
    assert body["parameters"]["details"] is True
    assert body["parameters"]["do_sample"] is False  # temperature 0: greedy
    assert "temperature" not in body["parameters"]  # TGI wants it strictly positive

    messages = await stream(client, request(model, stream=True))
    assert "".join(m.delta for m in messages) == expected.text
    last = messages[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert last.usage.prompt_tokens == expected.prompt_tokens  # details.input_length
    assert last.usage.completion_tokens == expected.completion_tokens


async def test_tgi_cuts_the_stop_sequence_it_includes(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    params = S(temperature=0, stop=[" fake"])
    assert tgi.expected_text(chat_prompt(), stop=[" fake"]) == "Hello, I am a fake"
    reply = await client.stub.Generate(request("tgi", params=params))
    assert reply.text == "Hello, I am a"
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE
    messages = await stream(client, request("tgi", stream=True, params=params))
    # Held back while it might still become the stop sequence, then dropped.
    assert "".join(m.delta for m in messages) == "Hello, I am a"
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE
    # A stop sequence that never completes costs nothing.
    params = S(temperature=0, stop=[" fakery"])
    messages = await stream(client, request("tgi", stream=True, params=params))
    assert "".join(m.delta for m in messages) == "Hello, I am a fake model."


async def test_tgi_parameters_grammar_and_adapter(client: GenerationClient, tgi: FakeTGI) -> None:
    params = S(max_tokens=5, temperature=0.7, top_p=1.0, top_k=40, repetition_penalty=1.1,
               seed=42, stop=["\n"])  # fmt: skip
    reply = await client.stub.Generate(request("tgi", params=params, adapter_id="acme/support"))
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert reply.adapter_id == "acme/support"
    parameters = tgi.requests_to(TGI_UNARY)[-1].json["parameters"]
    assert parameters == {
        "details": True, "return_full_text": False, "do_sample": True, "temperature": 0.7,
        "max_new_tokens": 5, "top_k": 40, "repetition_penalty": 1.1, "seed": 42,
        "stop": ["\n"], "adapter_id": "acme/support",
    }  # fmt: skip
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = F(type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema))
    reply = await client.stub.Generate(request("tgi", response_format=fmt))
    assert json.loads(reply.text) == {"answer": "Hello"}
    grammar = tgi.requests_to(TGI_UNARY)[-1].json["parameters"]["grammar"]
    assert grammar == {"type": "json", "value": schema}
    regex = F(type=generation_pb2.RESPONSE_FORMAT_TYPE_REGEX, regex="[0-9]{3}")
    await stream(client, request("tgi", stream=True, response_format=regex))
    grammar = tgi.requests_to(TGI_STREAM)[-1].json["parameters"]["grammar"]
    assert grammar == {"type": "regex", "value": "[0-9]{3}"}


async def test_tgi_raw_prompt_and_the_chat_template_requirement(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    reply = await client.stub.Generate(request("tgi-raw", "Once upon a time", prompt=True))
    assert tgi.requests_to(TGI_UNARY)[-1].json["inputs"] == "Once upon a time"
    assert reply.text == tgi.expected_text("Once upon a time")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("tgi-raw"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "chat_template" in (error.value.details() or "")


async def test_tgi_rejections_inside_a_200_stream_are_statuses(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    # Validation: the prompt plus max_new_tokens exceed the model's max_total_tokens.
    too_many = request("tgi", stream=True, params=S(temperature=0, max_tokens=100_000))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, too_many)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in (error.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("tgi", params=S(temperature=0, max_tokens=100_000)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # 422 on /generate
    # Overload is shed before any work: retried, then RESOURCE_EXHAUSTED.
    tgi.fail_next_tgi(429, "Model is overloaded", "overloaded", times=3)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("tgi"))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(tgi.requests_to(TGI_UNARY)) == 4  # the validation failure + 3 attempts


async def test_tgi_error_event_mid_stream(client: GenerationClient, tgi: FakeTGI) -> None:
    tgi.error_after_tokens = (3, "Request failed during generation: Unexpected<'CUDA OOM'>")
    messages = await stream(client, request("tgi", stream=True))
    assert_ended_by_error(messages, "Hello, I", "CUDA OOM")


async def test_tgi_overload_in_a_200_stream_is_retried_before_the_first_token(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    # /generate_stream sheds with 200 and an "overloaded" event: retried like a 429.
    tgi.fail_next_tgi(429, "Model is overloaded", "overloaded", times=2)
    messages = await stream(client, request("tgi", stream=True))
    assert "".join(m.delta for m in messages) == tgi.expected_text(chat_prompt())
    assert len(tgi.requests_to(TGI_STREAM)) == 3
    tgi.reset()
    tgi.fail_next_tgi(429, "Model is overloaded", "overloaded", times=5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request("tgi", stream=True))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Model is overloaded" in (error.value.details() or "")
    assert len(tgi.requests_to(TGI_STREAM)) == 3  # RETRY_ATTEMPTS, then given up


async def test_tgi_overload_after_the_first_token_is_not_retried(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    tgi.error_after_tokens, tgi.error_type = (2, ""), "overloaded"
    messages = await stream(client, request("tgi", stream=True))
    assert_ended_by_error(messages, "Hello,", "Model is overloaded")
    assert len(tgi.requests_to(TGI_STREAM)) == 1


# --- OpenAI-compatible servers -------------------------------------------------------------

OPENAI_FLAVOURS = ["vllm", "tgi-messages"]


@pytest.mark.parametrize("model", OPENAI_FLAVOURS)
async def test_openai_compatible_unary_and_stream(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    assert isinstance(fake, FakeOpenAI)
    expected = fake.generation("hello there")
    for reply in (
        await client.stub.Generate(request(model)),
        (await stream(client, request(model, stream=True)))[-1],
    ):
        assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP
        assert reply.usage.prompt_tokens == expected.prompt_tokens
        assert reply.usage.completion_tokens == expected.completion_tokens
        assert reply.backend == generation_pb2.GENERATION_BACKEND_OPENAI
    assert (await client.stub.Generate(request(model))).text == expected.text
    messages = await stream(client, request(model, stream=True))
    assert "".join(m.delta for m in messages) == expected.text
    params = S(temperature=0, max_tokens=3)
    reply = await client.stub.Generate(request(model, params=params))
    assert (reply.text, reply.finish_reason) == ("Hello, I", generation_pb2.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("model", OPENAI_FLAVOURS)
async def test_openai_compatible_stop_sequences(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    assert isinstance(fake, FakeOpenAI)
    # vLLM cuts the stop string and names it in stop_reason; TGI's messages API keeps it in
    # the text and says "stop_sequence". Either way the caller gets the text without it.
    kept = fake.expected_text("hello there", stop=[" fake"])
    assert kept == ("Hello, I am a fake" if model == "tgi-messages" else "Hello, I am a")
    params = S(temperature=0, stop=[" fake"])
    reply = await client.stub.Generate(request(model, params=params))
    assert reply.text == "Hello, I am a"
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE
    messages = await stream(client, request(model, stream=True, params=params))
    assert "".join(m.delta for m in messages) == "Hello, I am a"
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE
    # A stop sequence that never completes is held back only until it cannot.
    params = S(temperature=0, stop=[" fakery"])
    messages = await stream(client, request(model, stream=True, params=params))
    assert "".join(m.delta for m in messages) == "Hello, I am a fake model."
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP


async def test_tgi_messages_api_error_events_map_like_the_native_api(
    client: GenerationClient, tgi_messages: FakeOpenAI
) -> None:
    chat = "/v1/chat/completions"
    tgi_messages.error_after_tokens = (0, "`temperature` must be strictly positive")
    tgi_messages.error_type = "validation"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request("tgi-messages", stream=True))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`temperature` must be strictly positive" in (error.value.details() or "")
    assert len(tgi_messages.requests_to(chat)) == 1
    tgi_messages.error_type = "overloaded"  # shed before any work: retried, then given up
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request("tgi-messages", stream=True))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(tgi_messages.requests_to(chat)) == 1 + 3
    tgi_messages.error_after_tokens = (2, "CUDA OOM")
    tgi_messages.error_type = "generation"
    messages = await stream(client, request("tgi-messages", stream=True))
    assert_ended_by_error(messages, "Hello,", "Request failed during generation: CUDA OOM")


async def test_llama_cpp_error_field_in_a_stream_is_not_dropped(
    client: GenerationClient, llama_cpp: FakeOpenAI
) -> None:
    llama_cpp.error_after_tokens = (0, "the request exceeds the available context size")
    llama_cpp.error_type = "validation"  # code 400
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request("llama.cpp", stream=True))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the available context size" in (error.value.details() or "")
    llama_cpp.error_after_tokens = (2, "decode failed")
    llama_cpp.error_type = "generation"  # code 500
    messages = await stream(client, request("llama.cpp", stream=True))
    assert_ended_by_error(messages, "Hello,", "decode failed")


async def test_legacy_llama_cpp_error_field_in_a_stream_is_not_dropped(
    client: GenerationClient, llama_cpp_legacy: FakeOpenAI
) -> None:
    llama_cpp_legacy.error_after_tokens = (2, "decode failed")
    llama_cpp_legacy.error_type = "generation"  # an `error:` field with code 500
    messages = await stream(client, request("llama.cpp-legacy", stream=True))
    assert_ended_by_error(messages, "Hello,", "decode failed")


# --- Ollama ----------------------------------------------------------------------------------


async def test_ollama_chat_unary_and_stream(client: GenerationClient, ollama: FakeOllama) -> None:
    expected = ollama.generation("hello there")
    reply = await client.stub.Generate(request("ollama"))
    assert reply.text == expected.text
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert reply.usage.prompt_tokens == expected.prompt_tokens  # prompt_eval_count
    assert reply.usage.completion_tokens == expected.completion_tokens  # eval_count
    assert reply.backend == generation_pb2.GENERATION_BACKEND_OLLAMA
    body = ollama.requests_to("/api/chat")[-1].json
    assert body["model"] == "llama3.2" and body["stream"] is False
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["keep_alive"] == "10m"
    messages = await stream(client, request("ollama", stream=True))
    assert "".join(m.delta for m in messages) == expected.text
    assert messages[-1].usage.completion_tokens == expected.completion_tokens
    assert ollama.requests_to("/api/chat")[-1].json["stream"] is True


async def test_ollama_options_format_and_raw_prompt(
    client: GenerationClient, ollama: FakeOllama
) -> None:
    params = S(max_tokens=3, temperature=0.5, top_p=0.9, top_k=20, repetition_penalty=1.2,
               seed=1, stop=["END"])  # fmt: skip
    reply = await client.stub.Generate(request("ollama", params=params))
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH  # done_reason "length"
    assert ollama.requests_to("/api/chat")[-1].json["options"] == {
        "num_predict": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
        "repeat_penalty": 1.2, "seed": 1, "stop": ["END"],
    }  # fmt: skip
    await client.stub.Generate(request("ollama", response_format=F(type=R_JSON_OBJECT)))
    assert ollama.requests_to("/api/chat")[-1].json["format"] == "json"
    schema = {"type": "object"}
    fmt = F(type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema))
    await client.stub.Generate(request("ollama", response_format=fmt))
    assert ollama.requests_to("/api/chat")[-1].json["format"] == schema
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("ollama", response_format=F(type=R_REGEX, regex="a+")))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    messages = await stream(client, request("ollama", "Once upon a time", prompt=True, stream=True))
    assert "".join(m.delta for m in messages) == ollama.expected_text("Once upon a time")
    body = ollama.requests_to("/api/generate")[-1].json
    assert (body["prompt"], body["raw"]) == ("Once upon a time", True)


async def test_ollama_failures(client: GenerationClient, ollama: FakeOllama) -> None:
    ollama.error_after_tokens = (2, "llama runner process has terminated")
    messages = await stream(client, request("ollama", stream=True))
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_ERROR
    assert "llama runner process has terminated" in messages[-1].error
    ollama.reset()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("ollama-unpulled"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (error.value.details() or "")


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, grpc.StatusCode.INVALID_ARGUMENT), (500, grpc.StatusCode.UNAVAILABLE)],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_ollama_error_statuses(
    client: GenerationClient,
    ollama: FakeOllama,
    status: int,
    code: grpc.StatusCode,
    streaming: bool,
) -> None:
    ollama.fail_next_ollama(status, f"ollama says {status}", times=3)
    error = await rpc_error(client, request("ollama", stream=streaming))
    assert error.code() == code
    assert f"ollama says {status}" in (error.details() or "")
    assert len(ollama.requests_to("/api/chat")) == 1  # the server did work: not retried


async def test_ollama_readiness_names_a_model_not_pulled(client: GenerationClient) -> None:
    reply = await client.stub.ListModels(generation_pb2.GenerationServiceListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert models["ollama"].ready
    assert not models["ollama-unpulled"].ready
    assert "ollama pull mistral" in models["ollama-unpulled"].unavailable_reason


# --- every backend -------------------------------------------------------------------------

STREAM_PATHS = {
    "tgi": TGI_STREAM,
    "tgi-spaced": TGI_STREAM,
    "ollama": "/api/chat",
    "vllm": "/v1/chat/completions",
    "tgi-messages": "/v1/chat/completions",
}


@pytest.mark.parametrize("model", sorted(STREAM_PATHS))
async def test_cancel_mid_stream_closes_each_upstream(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    # The next token is a minute away, longer than the wait below: a disconnect seen
    # is the service closing the upstream on the cancel, not the stream ending.
    fake.token_delay_s = 60.0
    call = client.stub.GenerateStream(request(model, stream=True))
    assert (await call.read()).delta == "Hello"
    cancelled_at = time.monotonic()
    call.cancel()
    assert await asyncio.to_thread(fake.wait_for_disconnects, 1, 30.0)
    assert fake.last_disconnect_at is not None
    assert fake.last_disconnect_at >= cancelled_at  # closed because of the cancel
    assert len(fake.requests_to(STREAM_PATHS[model])) == 1


@pytest.mark.parametrize("model", sorted(STREAM_PATHS))
async def test_a_dropped_connection_mid_stream_is_not_retried(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    fake.disconnect_after_tokens = 3
    messages = await stream(client, request(model, stream=True))
    assert "".join(m.delta for m in messages).startswith("Hello")
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_ERROR
    assert messages[-1].error
    assert len(fake.requests_to(STREAM_PATHS[model])) == 1


@pytest.mark.parametrize("model", sorted(STREAM_PATHS))
async def test_a_slow_first_token_is_waited_for(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fakes[model].first_token_delay_s = 0.5
    messages = await stream(client, request(model, stream=True))
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert messages[-1].timings.time_to_first_token.ToMilliseconds() >= 450


@pytest.mark.parametrize("model", sorted(STREAM_PATHS))
async def test_a_success_that_is_not_json_is_unavailable(
    client: GenerationClient, fakes: dict[str, FakeLLMServer], model: str
) -> None:
    fake = fakes[model]
    page = "<html><body>502 Bad Gateway</body></html>"
    fake.fail_next(200, page, times=2)  # as a misconfigured proxy might answer
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request(model))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not JSON" in (error.value.details() or "") and "Bad Gateway" in (
        error.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(client, request(model, stream=True))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error.value.details() or ""
    assert "not an event stream" in details or "not JSON" in details, details  # NDJSON: Ollama


async def test_a_probe_answer_that_is_not_json_makes_the_model_unready(
    client: GenerationClient, ollama: FakeOllama
) -> None:
    async def ollama_model() -> Any:
        reply = await client.stub.ListModels(generation_pb2.GenerationServiceListModelsRequest())
        return next(m for m in reply.models if m.name == "ollama")

    async def until(ready: bool) -> Any:
        for _ in range(300):  # probed every 0.2 s; up to 30 s, for a busy machine
            model = await ollama_model()
            if model.ready == ready:
                break
            await asyncio.sleep(0.1)
        return model

    ollama.answer_with("/api/tags", 200, "<html>Sign in</html>")
    model = await until(ready=False)
    assert not model.ready
    assert "not JSON" in model.unavailable_reason and "Sign in" in model.unavailable_reason
    ollama.reset()
    assert (await until(ready=True)).ready
