"""Calling a backend: retries with backoff, only while nothing has been generated, and the
line after which a failure is reported inside the stream instead of as a status.

A request is retried only when the server did no work: the connection was refused, or it
shed the request with 429/503 (`ServiceError.retryable`). Once the first token has reached
the caller a retry would repeat text, so a later failure ends the stream with
FINISH_REASON_ERROR and the text so far stays delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter

from daert.generation.request import Delta, Finished, StreamEvent, merge_deltas
from daert.runtime.errors import ServiceError
from daert.runtime.rpc_context import remaining_s
from daert.v1 import generation_pb2

log = logging.getLogger("daert.generation")

UPSTREAM_RETRIES = Counter(
    "daert_generation_upstream_retries_total",
    "Requests sent again after a refused connection or a 429/503, by backend kind.",
    ["backend"],
)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    backoff_s: float

    def delay_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so retrying callers spread out."""
        return random.uniform(0, self.backoff_s * 2**attempt)

    async def wait_before_retry(self, attempt: int, error: ServiceError, label: str) -> None:
        """Sleep before attempt `attempt + 1`, or raise `error` when retrying is not allowed
        or would not fit in the caller's deadline."""
        if not error.retryable or attempt + 1 >= self.attempts:
            raise error
        delay = self.delay_s(attempt)
        if remaining_s(float("inf")) <= delay:
            raise error
        UPSTREAM_RETRIES.labels(label).inc()
        log.info("retrying upstream", extra={"attempt": attempt + 2, "error": error.message})
        await asyncio.sleep(delay)


async def complete_with_retries(
    policy: RetryPolicy, label: str, call: Callable[[], Awaitable[T]]
) -> T:
    attempt = 0
    while True:
        try:
            return await call()
        except ServiceError as error:
            await policy.wait_before_retry(attempt, error, label)
            attempt += 1


async def stream_with_retries(
    policy: RetryPolicy, label: str, open_stream: Callable[[], AsyncGenerator[StreamEvent, None]]
) -> AsyncGenerator[StreamEvent, None]:
    attempt = 0
    while True:
        started = False
        try:
            async with aclosing(open_stream()) as events:
                async for event in events:
                    started = True
                    yield event
            return
        except ServiceError as error:
            if started:
                yield Finished(generation_pb2.FINISH_REASON_ERROR, error=error.message)
                return
            await policy.wait_before_retry(attempt, error, label)
            attempt += 1


EventT = TypeVar("EventT")


async def merge_backlog(
    events: AsyncGenerator[EventT, None],
) -> AsyncGenerator[EventT | Delta, None]:
    """`events`, read ahead in a task of its own; deltas that pile up while the caller's
    stream is busy sending go out as one. Sending a gRPC message costs more than reading
    a token, so without this a fast server would be relayed at the pace of one message
    per token; with it, nothing waits that could be sent. Closing this closes `events`."""
    backlog: deque[EventT] = deque()
    arrived = asyncio.Event()
    failure: list[BaseException] = []
    done = False

    async def read_ahead() -> None:
        nonlocal done
        try:
            async with aclosing(events):
                async for event in events:
                    backlog.append(event)
                    arrived.set()
        except Exception as exc:  # raised to the caller in order, after what came before
            failure.append(exc)
        finally:
            done = True
            arrived.set()

    reader = asyncio.create_task(read_ahead())
    try:
        while True:
            if not backlog:
                if done:
                    if failure:
                        raise failure[0]
                    return
                arrived.clear()
                await arrived.wait()
                continue
            event = backlog.popleft()
            if isinstance(event, Delta):
                merged = [event]
                while backlog and isinstance(backlog[0], Delta):
                    merged.append(backlog.popleft())  # type: ignore[arg-type]
                yield merge_deltas(merged) if len(merged) > 1 else event
            else:
                yield event
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
