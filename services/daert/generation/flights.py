"""Coalescing: concurrent identical requests share one upstream generation.

The first request for a key starts a flight, a task that runs the generation and records
its events; every request for the key while it runs follows the same flight, live, from
its first event. The upstream work belongs to the flight, not to any one caller: it goes on
while any follower is left, and is cancelled (closing the upstream stream) when the last
one leaves. A failure before any output reaches every follower as the same status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Generic, TypeVar

from prometheus_client import Counter

COALESCED = Counter(
    "daert_generation_coalesced_total",
    "Requests that joined an identical request's upstream generation instead of starting one.",
)

EventT = TypeVar("EventT")


class _Flight(Generic[EventT]):
    def __init__(
        self, produce: Callable[[], AsyncGenerator[EventT, None]], land: Callable[[], None]
    ):
        self._events: list[EventT] = []
        self._done = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self._followers = 0
        self._land = land
        self._task = asyncio.create_task(self._run(produce))

    async def _run(self, produce: Callable[[], AsyncGenerator[EventT, None]]) -> None:
        try:
            async with aclosing(produce()) as events:
                async for event in events:
                    self._events.append(event)
                    self._notify()
        except Exception as exc:  # handed to every follower
            self._error = exc
        finally:
            self._done = True
            self._land()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncGenerator[EventT, None]:
        self._followers += 1
        try:
            seen = 0
            while True:
                if seen < len(self._events):
                    seen += 1
                    yield self._events[seen - 1]
                elif self._done:
                    if self._error is not None:
                        raise self._error
                    return
                else:
                    await self._changed.wait()
        finally:
            self._followers -= 1
            if self._followers == 0 and not self._done:
                self._land()  # nobody may join a flight that is being called off
                self._task.cancel()


class Flights(Generic[EventT]):
    def __init__(self) -> None:
        self._flights: dict[str, _Flight[EventT]] = {}

    def follow(
        self, key: str, produce: Callable[[], AsyncGenerator[EventT, None]]
    ) -> AsyncGenerator[EventT, None]:
        """The events of the flight for `key`, started with `produce` if none is under way."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(produce, lambda: self._land(key, flight))
            self._flights[key] = flight
        else:
            COALESCED.inc()
        return flight.follow()

    def _land(self, key: str, flight: _Flight[EventT] | None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
