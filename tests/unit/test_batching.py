"""MicroBatcher: coalescing, key separation, withdrawal on cancel, errors, overload."""

from __future__ import annotations

import asyncio

import pytest
from daert.runtime.batching import MicroBatcher
from daert.runtime.errors import ResourceExhausted
from daert.runtime.rpc_context import request_id_var


class Recorder:
    """A batch function that records every batch and can be held open."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list[str]]] = []
        self.request_ids: list[str | None] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = 0

    async def __call__(self, key: object, items: list[str]) -> list[str]:
        self.batches.append((key, list(items)))
        self.request_ids.append(request_id_var.get())
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if "boom" in items:
            raise ValueError("model exploded")
        return [f"{key}:{item}" for item in items]


def batcher(run: Recorder, **options: float) -> MicroBatcher[object, str, str]:
    settings = {"max_batch_size": 4, "max_wait_s": 0.02, "max_queued": 100, **options}
    b: MicroBatcher[object, str, str] = MicroBatcher("test", run, **settings)  # type: ignore[arg-type]
    b.start()
    return b


async def test_concurrent_submissions_share_batches_and_keep_order() -> None:
    run = Recorder()
    b = batcher(run)
    results = await asyncio.gather(*(b.submit("k", [f"t{i}"]) for i in range(10)))
    assert results == [[f"k:t{i}"] for i in range(10)]
    assert [len(items) for _, items in run.batches] == [4, 4, 2]
    await b.close()


async def test_a_large_submission_is_split_into_model_sized_batches() -> None:
    run = Recorder()
    b = batcher(run)
    assert await b.submit("k", [str(i) for i in range(9)]) == [f"k:{i}" for i in range(9)]
    assert [len(items) for _, items in run.batches] == [4, 4, 1]
    await b.close()


async def test_different_keys_never_share_a_batch() -> None:
    run = Recorder()
    b = batcher(run)
    await asyncio.gather(b.submit(True, ["a", "b"]), b.submit(False, ["c"]), b.submit(True, ["d"]))
    assert sorted((key, sorted(items)) for key, items in run.batches) == [
        (False, ["c"]),
        (True, ["a", "b", "d"]),
    ]
    await b.close()


async def test_cancelled_caller_is_withdrawn_before_the_model_sees_it() -> None:
    run = Recorder()
    run.gate.clear()  # hold the first batch open so the next items wait in the queue
    b = batcher(run, max_batch_size=1)
    first = asyncio.ensure_future(b.submit("k", ["first"]))
    await asyncio.sleep(0.05)
    withdrawn = asyncio.ensure_future(b.submit("k", ["withdrawn"]))
    kept = asyncio.ensure_future(b.submit("k", ["kept"]))
    await asyncio.sleep(0.01)
    withdrawn.cancel()
    run.gate.set()
    assert await first == ["k:first"]
    assert await kept == ["k:kept"]
    assert [items for _, items in run.batches] == [["first"], ["kept"]]
    await b.close()


async def test_batch_whose_callers_all_left_is_cancelled_and_worker_lives_on() -> None:
    run = Recorder()
    run.gate.clear()
    b = batcher(run)
    call = asyncio.ensure_future(b.submit("k", ["abandoned"]))
    await asyncio.sleep(0.05)
    assert run.batches, "the batch is running"
    call.cancel()
    await asyncio.sleep(0.01)
    assert run.cancelled == 1
    run.gate.set()
    assert await b.submit("k", ["next"]) == ["k:next"]
    await b.close()


async def test_a_failing_batch_fails_its_callers_only() -> None:
    run = Recorder()
    b = batcher(run, max_batch_size=2, max_wait_s=0.05)
    bad, good = await asyncio.gather(
        b.submit("k", ["boom"]), b.submit("other", ["fine"]), return_exceptions=True
    )
    assert isinstance(bad, ValueError)
    assert good == ["other:fine"]
    assert await b.submit("k", ["again"]) == ["k:again"]
    await b.close()


async def test_queue_limit_gives_resource_exhausted() -> None:
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_queued=3, max_batch_size=1)
    running = asyncio.ensure_future(b.submit("k", ["running"]))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(b.submit("k", ["a", "b", "c"]))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await b.submit("k", ["one too many"])
    run.gate.set()
    assert await running == ["k:running"]
    assert await queued == ["k:a", "k:b", "k:c"]
    await b.close()


async def test_batch_runs_with_the_request_ids_of_its_callers() -> None:
    run = Recorder()
    b = batcher(run, max_wait_s=0.05)

    async def submit_as(request_id: str, item: str) -> list[str]:
        request_id_var.set(request_id)
        return await b.submit("k", [item])

    await asyncio.gather(submit_as("r1", "a"), submit_as("r2", "b"))
    assert run.request_ids == ["r1,r2"]
    await b.close()


async def test_close_fails_waiting_callers_with_unavailable() -> None:
    from daert.runtime.errors import Unavailable

    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=1)
    running = asyncio.ensure_future(b.submit("k", ["running"]))
    waiting = asyncio.ensure_future(b.submit("k", ["waiting"]))
    await asyncio.sleep(0.05)
    await b.close()
    with pytest.raises(Unavailable):
        await waiting
    running.cancel()


async def test_a_lone_caller_does_not_wait_for_a_batch_to_fill() -> None:
    run = Recorder()
    # A batcher that waited for company would keep a lone caller for the hour; the 30 s
    # timeout only runs out then, however slow the machine.
    b = batcher(run, max_wait_s=3600)
    for _ in range(3):
        async with asyncio.timeout(30):
            assert await b.submit("k", ["alone"]) == ["k:alone"]
    assert [items for _, items in run.batches] == [["alone"]] * 3
    await b.close()


async def test_under_load_the_next_batch_waits_to_fill() -> None:
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=4, max_wait_s=0.2)
    first = asyncio.ensure_future(asyncio.gather(b.submit("k", ["a"]), b.submit("k", ["b"])))
    await asyncio.sleep(0.05)  # batch [a, b] is running: the batcher has company
    run.gate.set()
    await first
    # Arriving one by one shortly after, c and d still share one batch.
    late = [asyncio.ensure_future(b.submit("k", ["c"]))]
    await asyncio.sleep(0.05)
    late.append(asyncio.ensure_future(b.submit("k", ["d"])))
    await asyncio.gather(*late)
    assert [items for _, items in run.batches] == [["a", "b"], ["c", "d"]]
    await b.close()
