"""Log probabilities through a real generation server, against each backend's fake: the
request reaches the server in its own words (vLLM's logprobs/top_logprobs, completions'
logprobs: N, TGI's details and top_n_tokens), the fake model's deterministic values come
back unary and streamed, cached answers replay them, and Ollama (without them) and a model
configured without them say so, naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis
from daert.clients import GenerationClient, precondition_subjects
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import generation_pb2

from tests.fakes.llm import CANNED_REPLY, FakeLLMServer, token_logprob
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.tgi import FakeTGI
from tests.integration.generation_support import CHAT_TEMPLATE, models_env, request, rpc_error

LOGPROBS_DB = 4  # these tests' own Redis database: flushed before each test


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["base-model"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as fake:
        yield fake


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def cache_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{LOGPROBS_DB}"


@pytest.fixture(scope="module")
def generation(
    vllm: FakeOpenAI, tgi: FakeTGI, ollama: FakeOllama, cache_url: str
) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "vllm", "backend": "openai", "url": vllm.url, "upstream_model": "base-model"},
        {"name": "tgi", "backend": "tgi", "url": tgi.url, "chat_template": CHAT_TEMPLATE},
        {"name": "ollama", "backend": "ollama", "url": ollama.url, "upstream_model": "llama3.2"},
        {"name": "no-logprobs", "backend": "openai", "url": vllm.url,
         "upstream_model": "base-model", "supports_logprobs": False},
        redis_url=cache_url,
    )  # fmt: skip
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


@pytest.fixture(autouse=True)
def _fresh(vllm: FakeOpenAI, tgi: FakeTGI, ollama: FakeOllama, cache_url: str) -> None:
    for fake in (vllm, tgi, ollama):
        fake.reset()
    redis.Redis.from_url(cache_url).flushdb()


@pytest.fixture
async def client(generation: ServerProcess) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, max_attempts=1) as c:
        yield c


def expected(top: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """The fake model's reply, token by token, with its `top` alternatives."""
    return [
        (t, token_logprob(t), [(t + "~" * k, token_logprob(t) - k) for k in range(top)])
        for t in CANNED_REPLY
    ]


def entries(logprobs: Any) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [
        (lp.token, lp.logprob, [(a.token, a.logprob) for a in lp.top_logprobs]) for lp in logprobs
    ]


def last_body(fake: FakeLLMServer, path: str) -> dict[str, Any]:
    body = fake.requests_to(path)[-1].json
    assert isinstance(body, dict)
    return body


# (model, raw prompt?, the path the server is asked on)
SERVERS = [
    ("vllm", False, "/v1/chat/completions"),
    ("vllm", True, "/v1/completions"),
    ("tgi", False, "/generate"),
    ("tgi", True, "/generate"),
]
IDS = ["vllm-chat", "vllm-completions", "tgi-chat", "tgi-prompt"]


@pytest.mark.parametrize(("model", "prompt", "path"), SERVERS, ids=IDS)
async def test_logprobs_come_back_unary_and_streamed(
    client: GenerationClient,
    vllm: FakeOpenAI,
    tgi: FakeTGI,
    model: str,
    prompt: bool,
    path: str,
) -> None:
    fake: FakeLLMServer = vllm if model == "vllm" else tgi
    fields = {"prompt": prompt, "logprobs": True, "top_logprobs": 2}
    # BYPASS: each call reaches the server (caching is test_cached_answers_replay_them).
    bypass = generation_pb2.CACHE_POLICY_BYPASS
    reply = await client.stub.Generate(request(model, cache_policy=bypass, **fields))
    assert entries(reply.logprobs) == expected(2)
    assert "".join(lp.token for lp in reply.logprobs) == reply.text
    sent = last_body(fake, path)
    if model == "tgi":
        assert sent["parameters"]["details"] is True
        assert sent["parameters"]["top_n_tokens"] == 2
    elif prompt:
        assert sent["logprobs"] == 2
    else:
        assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    messages = [
        m
        async for m in client.stub.GenerateStream(
            request(model, stream=True, cache_policy=bypass, **fields)
        )
    ]
    # Each message carries the tokens of its own delta.
    assert all("".join(lp.token for lp in m.logprobs) == m.delta for m in messages)
    assert entries([lp for m in messages for lp in m.logprobs]) == expected(2)


@pytest.mark.parametrize("model", ["vllm", "tgi"])
async def test_without_logprobs_none_are_asked_for_or_returned(
    client: GenerationClient, vllm: FakeOpenAI, tgi: FakeTGI, model: str
) -> None:
    reply = await client.stub.Generate(request(model))
    assert not reply.logprobs and reply.text
    if model == "vllm":
        assert "logprobs" not in last_body(vllm, "/v1/chat/completions")
    else:
        assert "top_n_tokens" not in last_body(tgi, "/generate")["parameters"]


async def test_cached_answers_replay_them(client: GenerationClient, vllm: FakeOpenAI) -> None:
    first = await client.stub.Generate(request("vllm", logprobs=True, top_logprobs=1))
    again = await client.stub.Generate(request("vllm", logprobs=True, top_logprobs=1))
    assert again.cached and entries(again.logprobs) == entries(first.logprobs) == expected(1)
    replayed = [
        m
        async for m in client.stub.GenerateStream(
            request("vllm", stream=True, logprobs=True, top_logprobs=1)
        )
    ]
    assert replayed[-1].cached
    assert entries([lp for m in replayed for lp in m.logprobs]) == expected(1)
    # Other alternatives, or none, are another answer: the key holds them.
    other = await client.stub.Generate(request("vllm", logprobs=True, top_logprobs=2))
    plain = await client.stub.Generate(request("vllm"))
    assert not other.cached and entries(other.logprobs) == expected(2)
    assert not plain.cached and not plain.logprobs
    assert len(vllm.requests_to("/v1/chat/completions")) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("ollama", "Ollama does not return log probabilities"),
        ("no-logprobs", "model 'no-logprobs' does not return log probabilities"),
    ],
)
async def test_a_backend_without_logprobs_is_a_precondition_naming_them(
    client: GenerationClient, ollama: FakeOllama, model: str, message: str, stream: bool
) -> None:
    error = await rpc_error(client, request(model, stream=stream, logprobs=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == message
    assert precondition_subjects(error) == ["logprobs"]
    assert not ollama.requests_to("/api/chat")  # refused before any server was asked


async def test_list_models_says_which_give_them(client: GenerationClient) -> None:
    listed = await client.stub.ListModels(generation_pb2.GenerationServiceListModelsRequest())
    supports = {m.name: m.supports_logprobs for m in listed.models}
    assert supports == {"vllm": True, "tgi": True, "ollama": False, "no-logprobs": False}


@pytest.mark.parametrize(
    "fields", [{"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}], ids=["alone", "21"]
)
async def test_bad_top_logprobs_are_named(client: GenerationClient, fields: dict[str, Any]) -> None:
    error = await rpc_error(client, request("vllm", **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("top_logprobs:")
