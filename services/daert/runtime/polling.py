"""Waiting on state another process changes (in Redis, say), asked again with backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def poll_while(
    ask: Callable[[], Awaitable[T]],
    waiting: T,
    deadline: Callable[[], float],
    first_pause_s: float,
    max_pause_s: float,
) -> T:
    """Ask until the answer is no longer `waiting` or `deadline()` (time.monotonic()) has
    passed, pausing `first_pause_s` at first and twice as long each time up to
    `max_pause_s`; returns the last answer (still `waiting` when time ran out). The deadline
    is asked anew each round, so its owner may move it."""
    pause = first_pause_s
    while (answer := await ask()) == waiting and time.monotonic() < deadline():
        await asyncio.sleep(pause)
        pause = min(pause * 2, max_pause_s)
    return answer
