"""Per-key requests-per-minute and tokens-per-minute limits, shared by every gateway replica
through Redis. Each check is one Lua script run (atomic, one round trip), on Redis's clock so
replicas with skewed clocks still agree.

The window slides: each key keeps a hash of one-second buckets (second -> count), and a
check sums the last 60. Fixed minute windows would let a client send twice its limit across
a minute boundary, and a log of every request would cost memory per request (and a sum over
it for tokens); 60 buckets bound both the memory and the work per check while keeping the
window exact to within a second.

Limits are an optimisation of fairness, not a dependency: when Redis is down or slow the
request is admitted (fail open), counted in `daert_gateway_rate_limit_fail_open_total` and
logged at most every few seconds; the limiter uses Redis again as soon as it answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from prometheus_client import Counter

from daert.gateway.keys import ApiKey
from daert.runtime.redis_state import RedisState

FAIL_OPEN = Counter(
    "daert_gateway_rate_limit_fail_open_total",
    "Requests admitted without a rate-limit check because Redis was unavailable.",
)

WINDOW_S = 60

# KEYS: the key's request buckets, its token buckets. ARGV: window (s), the request limit,
# the token limit (0: none), the tokens this request needs. Returns whether it is admitted,
# the ms until it would be (0 when admitted), then for requests and for tokens: what the
# window holds and the ms until it is empty.
_ADMIT = """
local window = tonumber(ARGV[1])
local rpm, tpm, need = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local time = redis.call('TIME')
local second = tonumber(time[1])
local now_ms = second * 1000 + math.floor(tonumber(time[2]) / 1000)

-- The live buckets of a hash, oldest first, and their total (expired ones are deleted).
local function live(key)
  local raw = redis.call('HGETALL', key)
  local buckets, total, expired = {}, 0, {}
  for i = 1, #raw, 2 do
    local start, count = tonumber(raw[i]), tonumber(raw[i + 1])
    if start + window <= second then
      expired[#expired + 1] = raw[i]
    else
      buckets[#buckets + 1] = {start, count}
      total = total + count
    end
  end
  if #expired > 0 then redis.call('HDEL', key, unpack(expired)) end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  return buckets, total
end

-- Milliseconds until the buckets' total falls to `target` as they expire, oldest first.
local function wait_ms(buckets, total, target)
  for _, bucket in ipairs(buckets) do
    total = total - bucket[2]
    if total <= target then return (bucket[1] + window) * 1000 - now_ms end
  end
  return 0
end

local function empty_ms(buckets)
  if #buckets == 0 then return 0 end
  return (buckets[#buckets][1] + window) * 1000 - now_ms
end

local requests, requests_total = live(KEYS[1])
local tokens, tokens_total = live(KEYS[2])
local admitted, retry_ms = 1, 0
if rpm > 0 and requests_total + 1 > rpm then
  admitted, retry_ms = 0, math.max(retry_ms, wait_ms(requests, requests_total, rpm - 1))
end
if tpm > 0 and tokens_total + need > tpm then
  admitted, retry_ms = 0, math.max(retry_ms, wait_ms(tokens, tokens_total, tpm - need))
end
if admitted == 1 and rpm > 0 then
  redis.call('HINCRBY', KEYS[1], second, 1)
  redis.call('EXPIRE', KEYS[1], window)
  requests[#requests + 1] = {second, 1}
  requests_total = requests_total + 1
end
return {admitted, retry_ms, requests_total, empty_ms(requests), tokens_total, empty_ms(tokens)}
"""

# KEYS: the key's token buckets. ARGV: window (s), tokens used.
_RECORD = """
local second = redis.call('TIME')[1]
redis.call('HINCRBY', KEYS[1], second, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class LimitDecision:
    allowed: bool
    retry_after_s: float = 0.0  # 0 when allowed
    headers: dict[str, str] = field(default_factory=dict)  # only for the limits the key has


ADMITTED = LimitDecision(True)


def reset_duration(ms: int) -> str:
    """OpenAI's format for x-ratelimit-reset-*: `0s`, `17ms`, `1s`, `8.64s`, `6m0s`."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _headers(kind: str, limit: int, used: int, reset_ms: int) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
        f"x-ratelimit-reset-{kind}": reset_duration(reset_ms),
    }


class RateLimiter:
    def __init__(
        self, redis_url: str | None, *, timeout_s: float = 0.25, window_s: int = WINDOW_S
    ) -> None:
        """`redis_url` None: no limits enforced. `window_s` is a minute except in tests."""
        self._redis = RedisState("gateway", redis_url, None, timeout_s) if redis_url else None
        self._window_s = window_s
        if self._redis is not None:
            # A broken connection is retried once by the runtime's client; a timeout is not
            # (the script may have run, and would count twice).
            self._admit = self._redis.client.register_script(_ADMIT)
            self._record = self._redis.client.register_script(_RECORD)

    @staticmethod
    def _keys(key: ApiKey) -> tuple[str, str]:
        # One hash tag per API key: both hashes live on the same Redis Cluster slot.
        return f"daert:ratelimit:{{{key.id}}}:requests", f"daert:ratelimit:{{{key.id}}}:tokens"

    async def admit(self, key: ApiKey, estimated_tokens: int = 0) -> LimitDecision:
        """Count this request, unless its requests-per-minute limit is reached or its
        tokens-per-minute limit would be exceeded: tokens already used in the window plus
        `estimated_tokens` (at least 1, at most the whole limit, so a request larger than
        the limit runs alone in its window instead of never)."""
        if self._redis is None or (key.rpm_limit is None and key.tpm_limit is None):
            return ADMITTED
        rpm, tpm = key.rpm_limit or 0, key.tpm_limit or 0
        need = min(max(estimated_tokens, 1), tpm)
        call = partial(self._admit, keys=self._keys(key), args=(self._window_s, rpm, tpm, need))
        reply = await self._redis.attempt("rate_limit", call, None)
        if reply is None:
            FAIL_OPEN.inc()
            return ADMITTED
        admitted, retry_ms, requests, requests_reset, tokens, tokens_reset = map(int, reply)
        headers: dict[str, str] = {}
        if key.rpm_limit is not None:
            headers |= _headers("requests", rpm, requests, requests_reset)
        if key.tpm_limit is not None:
            headers |= _headers("tokens", tpm, tokens, tokens_reset)
        return LimitDecision(bool(admitted), retry_ms / 1000, headers)

    async def record_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count tokens a response used (a stream's too) against the key's limit. Lost
        while Redis is down (counted in daert_redis_errors_total)."""
        if self._redis is None or key.tpm_limit is None or tokens <= 0:
            return
        _, token_buckets = self._keys(key)
        call = partial(self._record, keys=(token_buckets,), args=(self._window_s, tokens))
        await self._redis.attempt("record_tokens", call, None)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
