"""The parts of keys and limits that need no server: OpenAI's reset-duration format, a
limiter without Redis, and what a key allows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from daert.gateway.keys import ApiKey
from daert.gateway.limits import LimitDecision, RateLimiter, reset_duration


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (17, "17ms"),
        (1000, "1s"),
        (8640, "8.64s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (61_500, "1m1.5s"),
    ],
)
def test_reset_duration(ms: int, text: str) -> None:
    assert reset_duration(ms) == text


def _key(**fields: object) -> ApiKey:
    values: dict[str, object] = {
        "id": "0123456789ab",
        "name": "",
        "tenant": "acme",
        "models": (),
        "collections": (),
        "rpm_limit": 1,
        "tpm_limit": 1,
        "created_at": datetime.now(UTC),
        "revoked_at": None,
    }
    return ApiKey(**{**values, **fields})  # type: ignore[arg-type]


async def test_without_redis_nothing_is_enforced() -> None:
    limiter = RateLimiter(None)
    key = _key()
    await limiter.record_tokens(key, 100)
    assert [await limiter.admit(key) for _ in range(3)] == [LimitDecision(True, 0.0, {})] * 3
    await limiter.close()


def test_allowances() -> None:
    everything = _key()
    assert everything.allows_model("any") and everything.allows_collection("any")
    narrow = _key(models=("m1",), collections=("docs",))
    assert narrow.allows_model("m1") and not narrow.allows_model("m1-adapter")
    assert narrow.allows_collection("docs") and not narrow.allows_collection("Docs")
