"""The gateway's rate limits on a real Redis: requests and tokens per minute with OpenAI's
headers, one limit shared by two limiters (as two gateway replicas), atomic under
concurrency, and failing open (counted) while Redis is down or silent, then enforced again."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from daert.gateway.keys import ApiKey
from daert.gateway.limits import LimitDecision, RateLimiter
from daert.local.redis import EmbeddedRedis
from prometheus_client import REGISTRY

DURATION = re.compile(r"^(\d+ms|(\d+m)?\d+(\.\d+)?s)$")


def _key(rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    """A fresh key id per test: the buckets in the shared Redis are per key."""
    return ApiKey(
        id=uuid.uuid4().hex[:12],
        name="",
        tenant="acme",
        models=(),
        collections=(),
        rpm_limit=rpm,
        tpm_limit=tpm,
        created_at=datetime.now(UTC),
        revoked_at=None,
    )


def _fail_open_total() -> float:
    return REGISTRY.get_sample_value("daert_gateway_rate_limit_fail_open_total") or 0.0


@pytest.fixture
async def limiter(redis_server: EmbeddedRedis) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(redis_server.url)
    yield limiter
    await limiter.close()


async def test_requests_per_minute(limiter: RateLimiter) -> None:
    key = _key(rpm=3)
    decisions = [await limiter.admit(key) for _ in range(3)]
    assert all(d.allowed and d.retry_after_s == 0 for d in decisions)
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["2", "1", "0"]
    first = decisions[0].headers
    assert first["x-ratelimit-limit-requests"] == "3"
    assert DURATION.match(first["x-ratelimit-reset-requests"])
    assert not any("tokens" in name for name in first)  # only the limits the key has
    refused = await limiter.admit(key)
    assert not refused.allowed
    assert 0 < refused.retry_after_s <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # A refused request is not counted, and other keys are not held back.
    assert (await limiter.admit(key)).headers["x-ratelimit-remaining-requests"] == "0"
    assert (await limiter.admit(_key(rpm=3))).allowed


async def test_tokens_per_minute(limiter: RateLimiter) -> None:
    key = _key(tpm=10)
    admitted = await limiter.admit(key)
    assert admitted.allowed
    assert admitted.headers == {
        "x-ratelimit-limit-tokens": "10",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "0s",
    }
    await limiter.record_tokens(key, 7)
    decision = await limiter.admit(key)
    assert decision.allowed and decision.headers["x-ratelimit-remaining-tokens"] == "3"
    assert not (await limiter.admit(key, estimated_tokens=4)).allowed  # 7 + 4 > 10
    assert (await limiter.admit(key, estimated_tokens=3)).allowed
    await limiter.record_tokens(key, 5)  # a streamed response's usage, recorded at its end
    refused = await limiter.admit(key)
    assert not refused.allowed and 0 < refused.retry_after_s <= 60
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert DURATION.match(refused.headers["x-ratelimit-reset-tokens"])


async def test_both_limits_and_a_key_without_any(limiter: RateLimiter) -> None:
    key = _key(rpm=100, tpm=5)
    await limiter.admit(key)
    await limiter.record_tokens(key, 5)
    refused = await limiter.admit(key)
    assert not refused.allowed  # the tokens, though requests remain
    assert refused.headers["x-ratelimit-remaining-requests"] == "99"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    unlimited = _key()
    await limiter.record_tokens(unlimited, 1000)
    assert await limiter.admit(unlimited) == LimitDecision(True, 0.0, {})


async def test_the_window_slides(redis_server: EmbeddedRedis) -> None:
    """A 2-second window for speed: the request counted in it is forgotten when it ends."""
    limiter = RateLimiter(redis_server.url, window_s=2)
    try:
        key = _key(rpm=1)
        assert (await limiter.admit(key)).allowed
        refused = await limiter.admit(key)
        assert not refused.allowed and 0 < refused.retry_after_s <= 2
        await asyncio.sleep(refused.retry_after_s + 0.05)
        assert (await limiter.admit(key)).allowed
    finally:
        await limiter.close()


async def test_two_replicas_share_one_limit(redis_server: EmbeddedRedis) -> None:
    replicas = [RateLimiter(redis_server.url), RateLimiter(redis_server.url)]
    try:
        key = _key(rpm=4, tpm=100)
        assert [(await replicas[i % 2].admit(key)).allowed for i in range(4)] == [True] * 4
        assert not (await replicas[0].admit(key)).allowed
        assert not (await replicas[1].admit(key)).allowed
        tokens = _key(tpm=10)
        await replicas[0].record_tokens(tokens, 10)
        assert not (await replicas[1].admit(tokens)).allowed
    finally:
        for replica in replicas:
            await replica.close()


async def test_concurrent_admits_never_exceed_the_limit(redis_server: EmbeddedRedis) -> None:
    replicas = [RateLimiter(redis_server.url), RateLimiter(redis_server.url)]
    try:
        key = _key(rpm=10)
        decisions = await asyncio.gather(*(replicas[i % 2].admit(key) for i in range(60)))
        assert sum(d.allowed for d in decisions) == 10
        remaining = sorted(int(d.headers["x-ratelimit-remaining-requests"]) for d in decisions)
        assert remaining[-10:] == list(range(10))  # each admission saw its own count
    finally:
        for replica in replicas:
            await replica.close()


async def test_redis_down_fails_open_then_enforces_again(redis_server: EmbeddedRedis) -> None:
    limiter = RateLimiter(redis_server.url)
    try:
        key = _key(rpm=1, tpm=10)
        assert (await limiter.admit(key)).allowed
        assert not (await limiter.admit(key)).allowed
        before = _fail_open_total()
        redis_server.stop()
        try:
            for _ in range(3):  # over the limit, but it cannot be checked
                decision = await asyncio.wait_for(limiter.admit(key), timeout=10)
                assert decision.allowed and decision.headers == {}
            await asyncio.wait_for(limiter.record_tokens(key, 5), timeout=10)  # no exception
            assert _fail_open_total() == before + 3
        finally:
            redis_server.start()
        fresh = _key(rpm=1)
        assert (await limiter.admit(fresh)).allowed
        assert not (await limiter.admit(fresh)).allowed
        assert _fail_open_total() == before + 3
    finally:
        await limiter.close()


async def test_redis_restarted_between_checks(redis_server: EmbeddedRedis) -> None:
    """Its pooled connection broken by a restart it did not see, the limiter reconnects."""
    limiter = RateLimiter(redis_server.url)
    try:
        assert (await limiter.admit(_key(rpm=5))).allowed
        redis_server.stop()
        redis_server.start()
        key = _key(rpm=1)
        assert (await limiter.admit(key)).allowed
        assert not (await limiter.admit(key)).allowed
    finally:
        await limiter.close()


async def test_a_silent_redis_does_not_hold_requests() -> None:
    """A listener that never answers: the short socket timeout, then fail open."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        limiter = RateLimiter(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.2)
        try:
            before = _fail_open_total()
            decision = await asyncio.wait_for(limiter.admit(_key(rpm=1)), timeout=10)
            assert decision.allowed and _fail_open_total() == before + 1
        finally:
            await limiter.close()
