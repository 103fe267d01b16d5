"""The official openai SDK, sync and async, against the gateway in front of real services:
an application written for OpenAI's API works with only its base URL and key changed."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from daert.clients import EmbeddingClient
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess

from tests.fakes.openai import FakeOpenAI
from tests.gateway.conftest import CHAT_MODEL, EMBEDDING_MODEL, NO_SERVICE, Keys, gateway_env

HELLO = [{"role": "user", "content": "Say hello"}]
CANNED = "Hello, I am a fake model."


@pytest.fixture
def client(gateway_server: ServerProcess, api_key: str) -> openai.OpenAI:
    # No SDK retries: each test sees the gateway's first answer.
    return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture
def async_client(gateway_server: ServerProcess, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway_server.url}/v1", api_key=api_key, max_retries=0)


def test_chat_completion(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.model == CHAT_MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == CANNED
    assert choice.finish_reason == "stop"
    generation = fake_vllm.generation("Say hello")
    assert reply.usage is not None
    assert reply.usage.completion_tokens == generation.completion_tokens
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    sent = fake_vllm.requests[-1].json
    assert sent["temperature"] == 0
    assert sent["messages"] == [{"role": "user", "content": "Say hello"}]


def test_sampling_parameters_reach_the_llm_server(
    client: openai.OpenAI, fake_vllm: FakeOpenAI, gateway_server: ServerProcess
) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=HELLO,
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["never"],
        user="end-user-1",
        extra_body={"top_k": 5},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    sent = fake_vllm.requests[-1].json
    assert (sent["max_tokens"], sent["top_p"], sent["seed"], sent["top_k"]) == (3, 0.9, 7, 5)
    assert sent["temperature"] == pytest.approx(0.5)
    assert sent["stop"] == ["never"]
    # `user` is the application's end user: logged with the request, not sent upstream.
    assert "user" not in sent
    logged = [e for e in gateway_server.logs() if e.get("end_user") == "end-user-1"]
    assert logged and logged[-1]["path"] == "/v1/chat/completions" and logged[-1]["tenant"]


def test_streamed_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=HELLO,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CANNED
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9  # 8 tokens and the end of sequence
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_async_client_unary_and_streamed(async_client: openai.AsyncOpenAI) -> None:
    reply = await async_client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, temperature=0
    )
    assert reply.choices[0].message.content == CANNED
    stream = await async_client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == CANNED
    embedded = await async_client.embeddings.create(model=EMBEDDING_MODEL, input="hello")
    assert len(embedded.data[0].embedding) == 384


def test_json_schema_output(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=HELLO,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    assert json.loads(reply.choices[0].message.content or "") == {"answer": "Hello"}
    sent = fake_vllm.requests[-1].json
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"] == schema


def test_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", max_tokens=4)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Hello, I am"
    assert reply.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello, I am"


async def test_embeddings_float_and_base64_equal_the_grpc_vectors(
    client: openai.OpenAI, embedding_server: ServerProcess
) -> None:
    texts = ["the cat sat on the mat", "PostgreSQL stores vectors"]
    as_floats = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    raw = client.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL, input=texts, encoding_format="base64"
    )
    async with EmbeddingClient(embedding_server.target) as grpc_client:
        direct = await grpc_client.embed_texts(texts, model=EMBEDDING_MODEL)
    for i, vector in enumerate(direct):
        assert as_floats.data[i].embedding == pytest.approx(vector, abs=1e-7)
        encoded = raw.http_response.json()["data"][i]["embedding"]
        decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
        assert decoded.tolist() == pytest.approx(vector, abs=1e-7)
    assert as_floats.usage.prompt_tokens > 0
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMBEDDING_MODEL, input="the cat sat on the mat")
    assert default.data[0].embedding == pytest.approx(direct[0], abs=1e-7)
    shorter = client.embeddings.create(model=EMBEDDING_MODEL, input="cat", dimensions=64)
    assert len(shorter.data[0].embedding) == 64


def test_models(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert listed[CHAT_MODEL].owned_by == "openai-compatible"
    assert listed[EMBEDDING_MODEL].owned_by == "sentence-transformers"
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_rerank(gateway_server: ServerProcess, api_key: str) -> None:
    reply = httpx.post(
        f"{gateway_server.url}/v1/rerank",
        headers={"authorization": f"Bearer {api_key}"},
        json={
            "query": "what do cats eat?",
            "documents": ["stock prices fell", {"text": "cats eat fish and mice"}],
            "top_n": 2,
        },
    )
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["index"] for r in results] == [1, 0]
    assert results[0]["document"] == {"text": "cats eat fish and mice"}
    assert results[0]["relevance_score"] > results[1]["relevance_score"]


# ---------------------------------------------------------------- errors, in OpenAI's shape


def _error(exc: openai.APIStatusError) -> dict[str, object]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, object] = body["error"]
    return error


def test_bad_parameter_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, temperature=5)
    assert _error(caught.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, n=2)
    assert _error(caught.value)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        # Alternatives without log probabilities (test_logprobs.py has them answered).
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, top_logprobs=3)
    assert _error(caught.value)["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": [{"type": "image_url"}]}]
        )
    assert _error(caught.value)["param"] == "messages[0].content[0]"


def test_a_services_invalid_argument_names_the_openai_parameter(client: openai.OpenAI) -> None:
    # The empty stop sequence passes the gateway and is refused by the generation service;
    # its field `params.stop[0]` is OpenAI's `stop[0]`.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, stop=[""])
    assert _error(caught.value)["param"] == "stop[0]"


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert _error(caught.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=CHAT_MODEL, input="a chat model embeds nothing")


def test_keys_401_and_403(gateway_server: ServerProcess, keys: Keys) -> None:
    url = f"{gateway_server.url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="dk-not-a-key", max_retries=0).models.list()
    no_key = httpx.get(f"{url}/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    token = keys.create("acme", models=[EMBEDDING_MODEL])
    limited = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert [m.id for m in limited.models.list()] == [EMBEDDING_MODEL]
    keys.revoke(token)
    with pytest.raises(openai.AuthenticationError):
        limited.embeddings.create(model=EMBEDDING_MODEL, input="revoked")


def test_an_overloaded_llm_server_is_a_429(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    fake_vllm.fail_next_openai(429, "too many requests", "RateLimitError")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)


@pytest.fixture(scope="module")
def impatient_gateway(
    postgres: EmbeddedPostgres, generation_server: ServerProcess
) -> Iterator[ServerProcess]:
    """A gateway with a 1 s deadline per call, whose embedding service is gone."""
    env = gateway_env(postgres, None, generation=generation_server.target, embedding=NO_SERVICE)
    env["DAERT_GATEWAY_REQUEST_TIMEOUT_S"] = "1"
    with ServerProcess("gateway", env) as server:
        yield server


def test_dead_service_is_a_503_and_a_slow_one_a_504(
    impatient_gateway: ServerProcess, api_key: str, fake_vllm: FakeOpenAI
) -> None:
    client = openai.OpenAI(
        base_url=f"{impatient_gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model=EMBEDDING_MODEL, input="nobody is listening")
    assert caught.value.status_code == 503
    assert _error(caught.value)["code"] == "service_unavailable"
    fake_vllm.token_delay_s = 0.5  # 9 tokens: past the 1 s deadline
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert caught.value.status_code == 504
    ready = httpx.get(f"{impatient_gateway.url}/readyz")
    assert ready.status_code == 503 and ready.json()["services"]["embedding"] == "UNAVAILABLE"


def test_error_mid_stream_reaches_the_sdk(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    fake_vllm.error_after_tokens = (3, "the GPU fell over")
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="GPU fell over"):
        list(stream)


def test_client_disconnect_closes_the_llm_servers_stream(
    gateway_server: ServerProcess, api_key: str, fake_vllm: FakeOpenAI
) -> None:
    fake_vllm.token_delay_s = 0.2  # a 9-token answer would take ~2 s
    before = fake_vllm.disconnects
    with httpx.stream(
        "POST",
        f"{gateway_server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {api_key}"},
        json={"model": CHAT_MODEL, "messages": HELLO, "stream": True},
        timeout=10,
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        assert "Hello" in next(line for line in lines if line.startswith("data: {"))
        closed_at = time.monotonic()
    # The bound: the LLM server sees its stream closed within 1 s of the hang-up.
    while fake_vllm.disconnects == before and time.monotonic() - closed_at < 1.0:
        time.sleep(0.02)
    assert fake_vllm.disconnects == before + 1


def test_request_id_in_and_out(
    gateway_server: ServerProcess, api_key: str, generation_server: ServerProcess
) -> None:
    reply = httpx.post(
        f"{gateway_server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {api_key}", "x-request-id": "req-gateway-test-1"},
        json={"model": CHAT_MODEL, "messages": HELLO},
    )
    assert reply.headers["x-request-id"] == "req-gateway-test-1"
    assert any(e.get("request_id") == "req-gateway-test-1" for e in generation_server.logs())
    generated = httpx.get(f"{gateway_server.url}/healthz").headers["x-request-id"]
    assert len(generated) == 32


def test_health_readiness_metrics_docs(gateway_server: ServerProcess) -> None:
    assert httpx.get(f"{gateway_server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway_server.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["services"]["generation"] == "SERVING"
    assert ready.json()["services"]["lora"] == "UNAVAILABLE"  # reported, not required
    metrics = httpx.get(f"{gateway_server.url}/metrics").text
    assert "daert_gateway_requests_total" in metrics
    assert httpx.get(f"{gateway_server.url}/docs").status_code == 200
    spec = httpx.get(f"{gateway_server.url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
