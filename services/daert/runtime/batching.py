"""Dynamic micro-batching: coalesce items from concurrent RPCs into model-sized batches.

Callers `submit` a few items and await their results. One worker task forms batches of up to
`max_batch_size` items that share a key (items with different keys, e.g. different truncation
modes, never share a batch), waiting at most `max_wait_s` for a batch to fill. While a batch
runs, new items queue up, so under load batches grow by themselves without adding latency to
a lone caller. Items whose caller went away (cancelled, deadline passed) are dropped before
they reach the model, and a batch whose callers all went away is cancelled mid-flight, which
closes its upstream HTTP request. A batch's upstream call carries the request ids of all its
RPCs (comma-separated in x-request-id).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from daert.runtime.errors import ResourceExhausted, Unavailable
from daert.runtime.metrics import BATCH_QUEUE_DEPTH, BATCH_SIZE
from daert.runtime.rpc_context import current_request_id, request_id_var

log = logging.getLogger("daert.batching")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[K, T, R]):
    key: K
    item: T
    request_id: str | None = field(default_factory=current_request_id)
    future: asyncio.Future[R] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MicroBatcher(Generic[K, T, R]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[K, list[T]], Coroutine[Any, Any, Sequence[R]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queued: int,
    ) -> None:
        self._name = name
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queued = max_queued
        self._queue: deque[_Pending[K, T, R]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._depth = BATCH_QUEUE_DEPTH.labels(name)
        self._sizes = BATCH_SIZE.labels(name)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name=f"batcher-{self._name}")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable("server is shutting down"))
        self._depth.set(0)

    async def submit(self, key: K, items: Sequence[T]) -> list[R]:
        """Results for `items` in order. Cancelling the caller withdraws its items."""
        if self._worker is None:
            raise Unavailable(f"{self._name} is not running")
        if len(self._queue) + len(items) > self._max_queued:
            raise ResourceExhausted(
                f"{self._name} has {len(self._queue)} items queued (limit {self._max_queued}); "
                "retry with backoff"
            )
        pending = [_Pending[K, T, R](key, item) for item in items]
        self._queue.extend(pending)
        self._depth.set(len(self._queue))
        self._arrived.set()
        # gather cancels every item's future if this caller is cancelled.
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _live_count(self, key: K) -> int:
        return sum(1 for p in self._queue if p.key == key and not p.future.done())

    def _take_batch(self) -> list[_Pending[K, T, R]]:
        """Up to max_batch_size live items sharing the key of the oldest live item."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # withdrawn by a cancelled caller
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Pending[K, T, R]] = []
        rest: deque[_Pending[K, T, R]] = deque()
        for pending in self._queue:
            if pending.future.done():
                continue
            if pending.key == key and len(batch) < self._max_batch_size:
                batch.append(pending)
            else:
                rest.append(pending)
        self._queue = rest
        return batch

    async def _fill(self) -> None:
        """Wait up to max_wait_s for the oldest key's batch to fill."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        key = self._queue[0].key
        while self._live_count(key) < self._max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            # Not wait_for: on Python 3.11 it can swallow a cancellation (close) that
            # coincides with an arrival.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    async def _work(self) -> None:
        # Waiting for a batch to fill only pays when there is company: a lone caller would
        # wait for nobody. "Loaded": the last batch was shared, or others were already
        # queued when it ended.
        loaded = False
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if loaded and self._max_wait_s > 0:
                await self._fill()
            batch = self._take_batch()
            self._depth.set(len(self._queue))
            if batch:
                await self._run(batch)
                loaded = len(batch) > 1 or any(not p.future.done() for p in self._queue)

    async def _run(self, batch: list[_Pending[K, T, R]]) -> None:
        self._sizes.observe(len(batch))
        # The batch's upstream call and logs carry the request ids of every RPC in it.
        context = contextvars.copy_context()
        request_ids = dict.fromkeys(p.request_id for p in batch if p.request_id)
        context.run(request_id_var.set, ",".join(request_ids) or None)
        run = asyncio.create_task(
            self._run_batch(batch[0].key, [p.item for p in batch]), context=context
        )

        def abandon_if_nobody_waits(_: asyncio.Future[R]) -> None:
            if all(p.future.cancelled() for p in batch):
                run.cancel()

        for pending in batch:
            pending.future.add_done_callback(abandon_if_nobody_waits)
        try:
            results = await run
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: {len(batch)} items gave {len(results)} results")
        except asyncio.CancelledError:
            if run.cancelled() and not self._worker_cancelling():
                return  # every caller went away; nothing to deliver
            raise
        except Exception as exc:  # delivered to the callers; the worker lives on
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _worker_cancelling(self) -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
