"""vLLM adapter loads and unloads as the router makes them: one load shared by the routes
that arrive while it runs, vLLM's answers mapped to clear errors, unloads that never fail a
request and, for evicted adapters, wait until no route uses them. The replica's HTTP API is
an httpx mock answering as vLLM's serving_models.py does (the integration tests use the full
vLLM fake)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
from daert.lora.config import ReplicaConfig
from daert.lora.placement import EvictedState
from daert.lora.replicas import ReplicaPool
from daert.runtime.errors import FailedPrecondition, ResourceExhausted, Unavailable
from prometheus_client import REGISTRY

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def vllm_error(message: str, status: int, kind: str) -> httpx.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return httpx.Response(status, json=body)


def pool_with(handler: Handler, kind: str = "vllm") -> tuple[ReplicaPool, list[str]]:
    config = ReplicaConfig.model_validate(
        {"name": "v0", "url": "http://v0:8000", "kind": kind, "base_model": "base"}
    )
    restarted: list[str] = []

    async def on_restart(name: str) -> None:
        restarted.append(name)

    pool = ReplicaPool([config], on_restart)
    pool.get("v0").client = httpx.AsyncClient(
        base_url=config.url, transport=httpx.MockTransport(handler)
    )
    return pool, restarted


class Failures:
    """The `on_end` of a load: counts the loads that failed and those that succeeded."""

    def __init__(self) -> None:
        self.count = 0
        self.successes = 0

    async def __call__(self, ok: bool) -> None:
        if ok:
            self.successes += 1
        else:
            self.count += 1


async def test_routes_arriving_during_a_load_wait_for_it() -> None:
    release = asyncio.Event()
    calls: list[dict[str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        await release.wait()
        return httpx.Response(200, text="Success: LoRA adapter 'sql' added successfully.")

    pool, _ = pool_with(handler)
    failures = Failures()
    loading = asyncio.create_task(pool.load("v0", "sql", "/adapters/sql", failures))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(pool.wait_loading("v0", "sql"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release.set()
    await asyncio.gather(loading, waiting)
    assert calls == [{"lora_name": "sql", "lora_path": "/adapters/sql"}]
    assert (failures.count, failures.successes) == (0, 1) and pool.get("v0").loading == {}
    await pool.wait_loading("v0", "sql")  # nothing under way: returns at once


async def test_a_cancelled_caller_leaves_the_load_to_finish() -> None:
    release = asyncio.Event()
    done = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        done.set()
        return httpx.Response(200, text="Success")

    pool, _ = pool_with(handler)
    caller = asyncio.create_task(pool.load("v0", "sql", "/adapters/sql", Failures()))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert "sql" in pool.get("v0").loading
    release.set()
    await asyncio.wait_for(done.wait(), 1)
    await asyncio.sleep(0.01)
    assert pool.get("v0").loading == {}


@pytest.mark.parametrize(
    ("response", "error", "words"),
    [
        (
            vllm_error("Loading lora sql failed: No adapter found for /x", 404, "NotFoundError"),
            FailedPrecondition,
            "No adapter found for /x",
        ),
        (
            vllm_error("Both 'lora_name' and 'lora_path' must be provided.", 400, "BadRequest"),
            FailedPrecondition,
            "must be provided",
        ),
        (vllm_error("busy", 503, "ServiceUnavailable"), ResourceExhausted, "503"),
        (httpx.Response(500, text="boom"), Unavailable, "500"),
    ],
)
async def test_load_failures_name_adapter_source_and_replica(
    response: httpx.Response, error: type[Exception], words: str
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return response

    pool, _ = pool_with(handler)
    failures = Failures()
    with pytest.raises(error) as caught:
        await pool.load("v0", "sql", "/x", failures)
    message = str(getattr(caught.value, "message", caught.value))
    assert "'sql'" in message and "/x" in message and "'v0'" in message and words in message
    assert failures.count == 1


async def test_already_loaded_is_success_and_other_kinds_are_not_called() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return vllm_error(
            "The lora adapter 'sql' has already been loaded. If you want to load the adapter "
            "in place, set 'load_inplace' to True.",
            400,
            "InvalidUserInput",
        )

    pool, _ = pool_with(handler)
    await pool.load("v0", "sql", "/x", Failures())

    async def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("LoRAX loads adapters itself")

    lorax, _ = pool_with(never, kind="lorax")
    await lorax.load("v0", "sql", "/x", Failures())
    await lorax.unload("v0", "sql")


async def test_unload_never_fails_the_request() -> None:
    answers = iter(
        [
            httpx.Response(200, text="Success"),
            vllm_error("The lora adapter 'a' cannot be found.", 404, "NotFoundError"),
            httpx.Response(500, text="boom"),
        ]
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/unload_lora_adapter":
            raise AssertionError(request.url.path)
        try:
            return next(answers)
        except StopIteration:
            raise httpx.ConnectError("refused") from None

    pool, _ = pool_with(handler)
    for _ in range(4):
        await pool.unload("v0", "a")


async def test_a_replica_that_answers_again_after_failing_is_reported_restarted() -> None:
    healthy = [True, False, True]

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if healthy.pop(0) else 503)

    pool, restarted = pool_with(handler)
    for _ in range(3):
        await pool.probe_all()
    assert restarted == ["v0"] and pool.get("v0").ready is True


class States:
    """An `evicted_state` answering from a script, then its last answer; counts the calls."""

    def __init__(self, *answers: EvictedState) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self) -> EvictedState:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def unload_recorder() -> tuple[list[str], Handler]:
    """A vLLM that unloads whatever it is asked to, and the adapters it was asked for."""
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["lora_name"])
        return httpx.Response(200, text="Success")

    return calls, handler


def unloads(outcome: str) -> float:
    labels = {"replica": "v0", "outcome": outcome}
    return REGISTRY.get_sample_value("daert_lora_adapter_unloads_total", labels) or 0.0


async def test_an_evicted_adapter_is_unloaded_once_idle_and_not_if_resident_again() -> None:
    calls, handler = unload_recorder()
    pool, _ = pool_with(handler)
    busy = States("in_use", "in_use", "idle")
    pool.unload_when_idle("v0", "a", busy, patience_s=5.0)
    pool.unload_when_idle("v0", "a", States("idle"), patience_s=5.0)  # one at a time
    await asyncio.sleep(0.01)
    assert calls == [] and "a" in pool.get("v0").unloading
    await asyncio.sleep(0.3)  # polled after 50 ms, then 100 ms
    assert (calls, busy.calls) == (["a"], 3) and pool.get("v0").unloading == {}

    before = unloads("resident_again")
    pool.unload_when_idle("v0", "b", States("in_use", "resident"), patience_s=5.0)
    await asyncio.sleep(0.2)
    assert calls == ["a"] and unloads("resident_again") == before + 1

    lorax, _ = pool_with(handler, kind="lorax")
    lorax.unload_when_idle("v0", "c", States("idle"), patience_s=5.0)
    assert lorax.get("v0").unloading == {}


async def test_an_unload_waits_at_most_its_patience_and_a_later_eviction_extends_it() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("still in use: never unloaded")

    pool, _ = pool_with(handler)
    before = unloads("gave_up")
    pool.unload_when_idle("v0", "a", States("in_use"), patience_s=0.2)
    await asyncio.sleep(0.15)
    pool.unload_when_idle("v0", "a", States("in_use"), patience_s=0.2)  # evicted again
    await asyncio.sleep(0.15)
    assert "a" in pool.get("v0").unloading  # 0.3 s after the first eviction
    await asyncio.sleep(0.6)  # polled at 0.35 s or, just before its deadline, 0.75 s
    assert pool.get("v0").unloading == {} and unloads("gave_up") == before + 1


async def test_an_unload_now_or_close_ends_the_waiting_ones() -> None:
    calls, handler = unload_recorder()
    pool, _ = pool_with(handler)
    pool.unload_when_idle("v0", "a", States("in_use"), patience_s=60.0)
    pool.unload_when_idle("v0", "b", States("in_use"), patience_s=60.0)
    waiting = pool.get("v0").unloading["b"][0]
    await pool.unload("v0", "a")  # forgotten: unloaded at once
    assert calls == ["a"] and list(pool.get("v0").unloading) == ["b"]
    await pool.close()
    assert waiting.cancelled() and pool.get("v0").unloading == {} and calls == ["a"]
