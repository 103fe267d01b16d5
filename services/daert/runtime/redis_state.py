"""Redis for the services that keep shared state there (the generation cache, the LoRA
router). Redis is an optimisation, never a dependency of a request: every operation goes
through `RedisState.attempt`, which bounds it in time and, when Redis is down or slow, logs
it, counts it in `daert_redis_errors_total` and hands the caller a fallback instead."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("daert.redis")

REDIS_ERRORS = Counter(
    "daert_redis_errors_total",
    "Redis operations that failed or timed out; the request went on without Redis.",
    ["service", "operation"],
)

T = TypeVar("T")

# At most one warning per this many seconds while Redis stays down: a log line per request
# would drown everything else.
_WARN_EVERY_S = 10.0


def redis_client(url: str, password: str | None, timeout_s: float) -> redis.Redis:
    """A client that gives up quickly: a request must never wait long for an optimisation."""
    return redis.Redis.from_url(
        url,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a broken connection (Redis restarted since the pooled
        # connection's last use), else a restart costs one failed operation per pooled
        # connection. Not on a timeout: the wait would double.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )


class RedisState:
    """One service's Redis connection plus the error accounting around it."""

    def __init__(self, service: str, url: str, password: str | None, timeout_s: float) -> None:
        self.service = service
        self.client = redis_client(url, password, timeout_s)
        pool = self.client.connection_pool.connection_kwargs
        self.where = f"{pool.get('host', '?')}:{pool.get('port', '?')}"  # never the password
        self._last_warning = 0.0
        self.healthy = True  # as of the last operation

    async def attempt(self, operation: str, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        """`await call()`, or `fallback` when Redis fails (logged and counted)."""
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels(self.service, operation).inc()
            self.healthy = False
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "redis unavailable; going on without it",
                    extra={"operation": operation, "redis": self.where, "error": str(exc)},
                )
            return fallback
        self.healthy = True
        return result

    async def close(self) -> None:
        await self.client.aclose()
