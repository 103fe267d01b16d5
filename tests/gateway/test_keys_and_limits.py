"""API keys and their limits at the gateway's door: 429 with OpenAI's rate-limit headers,
one limit shared by two gateway replicas on one Redis, and requests still served (limits
failing open) while Redis is down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess

from tests.gateway.conftest import CHAT_MODEL, EMBEDDING_MODEL, Keys, gateway_env


@pytest.fixture(scope="module")
def second_gateway(
    postgres: EmbeddedPostgres, redis_server: EmbeddedRedis, embedding_server: ServerProcess
) -> Iterator[ServerProcess]:
    """Another replica: its own process, the same key store and the same Redis."""
    env = gateway_env(postgres, redis_server, embedding=embedding_server.target)
    with ServerProcess("gateway", env) as server:
        yield server


def _models_status(base_url: str, token: str) -> int:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.get(f"{base_url}/v1/models", headers=headers).status_code


def _embed(base_url: str, token: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/embeddings",
        headers={"authorization": f"Bearer {token}"},
        json={"model": EMBEDDING_MODEL, "input": "hello"},
        timeout=30,
    )


def test_requests_per_minute_is_a_429_with_headers(
    gateway_server: ServerProcess, keys: Keys
) -> None:
    token = keys.create("acme", rpm_limit=2)
    first = _embed(gateway_server.url, token)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert _embed(gateway_server.url, token).status_code == 200
    refused = _embed(gateway_server.url, token)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model=EMBEDDING_MODEL, input="one too many")
    # Another key is not held back by this one's limit.
    assert _embed(gateway_server.url, keys.create("acme", rpm_limit=2)).status_code == 200


def test_tokens_per_minute_counts_what_was_used(gateway_server: ServerProcess, keys: Keys) -> None:
    token = keys.create("acme", tpm_limit=5)
    used = _embed(gateway_server.url, token)  # "hello" is 3 tokens with [CLS] and [SEP]
    assert used.status_code == 200
    assert used.headers["x-ratelimit-limit-tokens"] == "5"
    assert _embed(gateway_server.url, token).status_code == 200  # 3 of 5 used: admitted
    refused = _embed(gateway_server.url, token)  # 6 of 5 used
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_two_gateways_share_one_limit(
    gateway_server: ServerProcess, second_gateway: ServerProcess, keys: Keys
) -> None:
    token = keys.create("acme", rpm_limit=4)
    statuses = [
        _embed(server.url, token).status_code
        for server in (gateway_server, second_gateway, gateway_server, second_gateway)
    ]
    assert statuses == [200] * 4
    assert _embed(gateway_server.url, token).status_code == 429
    assert _embed(second_gateway.url, token).status_code == 429


def test_redis_down_still_serves(
    gateway_server: ServerProcess, redis_server: EmbeddedRedis, keys: Keys
) -> None:
    token = keys.create("acme", rpm_limit=1)
    assert _embed(gateway_server.url, token).status_code == 200
    assert _embed(gateway_server.url, token).status_code == 429
    redis_server.stop()
    try:
        for _ in range(3):  # over the limit, but the limit cannot be checked: fail open
            assert _embed(gateway_server.url, token).status_code == 200
        metrics = httpx.get(f"{gateway_server.url}/metrics").text
        fail_open = [
            line
            for line in metrics.splitlines()
            if line.startswith("daert_gateway_rate_limit_fail_open_total")
        ]
        assert fail_open and float(fail_open[0].split()[-1]) >= 3
    finally:
        redis_server.start()
    fresh = keys.create("acme", rpm_limit=1)
    assert _embed(gateway_server.url, fresh).status_code == 200
    assert _embed(gateway_server.url, fresh).status_code == 429  # enforced again


def test_streamed_answers_count_their_tokens(gateway_server: ServerProcess, keys: Keys) -> None:
    token = keys.create("acme", tpm_limit=10)
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=token, max_retries=0)
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # The stream's usage (its prompt plus 9 completion tokens) is recorded once it ends; the
    # model list, which costs no tokens itself, then finds the key over its limit.
    deadline = time.monotonic() + 5
    while _models_status(gateway_server.url, token) == 200:
        assert time.monotonic() < deadline, "the streamed tokens were never counted"
        time.sleep(0.1)
    assert _models_status(gateway_server.url, token) == 429
