"""The shared runtime's promises, proven on the embedding server with a TEI upstream whose
speed and health the test controls: health transitions, deadlines and cancellation reaching
the upstream, overload, graceful drain on SIGTERM, and start-up configuration errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest
from daert.clients import EmbeddingClient
from daert.testing import ServerProcess
from daert.v1 import embedding_pb2

from tests.fakes import FakeTEI
from tests.helpers import free_port, models_env

SERVICE = "daert.v1.EmbeddingService"


@pytest.fixture
def tei() -> Iterator[FakeTEI]:
    with FakeTEI(dimensions=8, port=free_port()) as fake:
        yield fake


def tei_server(tei: FakeTEI, **env: str) -> ServerProcess:
    return ServerProcess(
        "embedding", {**models_env({"name": "m", "backend": "tei", "url": tei.url}), **env}
    )


def serving(tei: FakeTEI, **env: str) -> ServerProcess:
    """A started server that is SERVING, with the fake's start-up probes forgotten."""
    server = tei_server(tei, **env).start()
    server.wait_health("SERVING", timeout_s=10)
    tei.reset()
    return server


def wait_until(condition: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_health_follows_the_backend(tei: FakeTEI) -> None:
    tei.ready = False
    with tei_server(tei) as server:
        time.sleep(0.6)
        assert server.health() == "NOT_SERVING"
        assert server.health(SERVICE) == "NOT_SERVING"
        # Liveness is the process answering, not its backend: no restart for a TEI outage.
        assert server.health("liveness") == "SERVING"
        tei.ready = True
        # Polled, so only a health that never follows waits the 30 s.
        server.wait_health("SERVING", timeout_s=30)
        assert server.health(SERVICE) == "SERVING"

        port = tei.port
        tei.stop()  # the backend is lost
        server.wait_health("NOT_SERVING", timeout_s=30)
        assert server.health("liveness") == "SERVING"
        restarted = FakeTEI(dimensions=8, port=port).start()  # and comes back
        try:
            server.wait_health("SERVING", timeout_s=30)
        finally:
            restarted.stop()


async def test_deadline_closes_the_upstream_request(tei: FakeTEI) -> None:
    with serving(tei) as server:
        # Longer than the wait below: a disconnect seen is the server giving up, not TEI done.
        tei.delay_s = 60
        async with EmbeddingClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.Embed(embedding_pb2.EmbedRequest(inputs=["slow"]), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server gave up on the upstream call as well, instead of leaving TEI working.
        assert await asyncio.to_thread(tei.wait_for_disconnects, 1, 30.0)
        tei.delay_s = 0
        async with EmbeddingClient(server.target) as client:
            assert len(await client.embed_texts(["after"])) == 1
        entries = [e for e in server.logs() if e.get("code") == "DEADLINE_EXCEEDED"]
        assert entries, "the expired RPC is logged with its code"


async def test_cancelled_call_closes_the_upstream_request(tei: FakeTEI) -> None:
    with serving(tei) as server:
        tei.delay_s = 60  # longer than the waits: only the cancel can end the request
        async with EmbeddingClient(server.target) as client:
            call = client.stub.Embed(embedding_pb2.EmbedRequest(inputs=["to be cancelled"]))
            assert await asyncio.to_thread(tei.wait_for_requests, 1, 30.0, "/embed")
            call.cancel()
            assert await asyncio.to_thread(tei.wait_for_disconnects, 1, 30.0)
            tei.delay_s = 0
            assert len(await client.embed_texts(["the batcher still works"])) == 1


async def test_overload_is_resource_exhausted(tei: FakeTEI) -> None:
    with serving(tei, DAERT_EMBEDDING_MAX_QUEUED_INPUTS="4") as server:
        # TEI is held until a call was refused, so the 12 calls overflow the queue however
        # slowly they arrive; then it is released and the accepted ones finish.
        tei.delay_s = 600
        async with EmbeddingClient(server.target) as client:
            calls = [
                asyncio.ensure_future(client.embed_texts([f"t{i}"], timeout_s=60))
                for i in range(12)
            ]
            await asyncio.wait(calls, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            tei.delay_s = 0
            results = await asyncio.gather(*calls, return_exceptions=True)
        codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(isinstance(r, list) for r in results)
        assert server.health() == "SERVING"


@asynccontextmanager
async def sigterm_during_a_call(
    tei: FakeTEI, grace_s: float, upstream_delay_s: float
) -> AsyncIterator[tuple[ServerProcess, asyncio.Future[list[list[float]]]]]:
    """SIGTERM a server while a call (30 s deadline) waits on its upstream; on leaving, the
    process must have exited 0 (waited for up to 30 s: a busy machine may be slow to)."""
    server = serving(tei, DAERT_EMBEDDING_GRACE_PERIOD_S=str(grace_s))
    try:
        tei.delay_s = upstream_delay_s
        async with EmbeddingClient(server.target) as client:
            call = asyncio.ensure_future(client.embed_texts(["in flight"], timeout_s=30))
            assert await asyncio.to_thread(tei.wait_for_requests, 1, 30.0, "/embed")
            server.terminate()
            yield server, call
        assert server.process is not None
        assert await asyncio.to_thread(server.process.wait, 30) == 0
    finally:
        server.stop()


async def test_sigterm_lets_the_in_flight_call_finish(tei: FakeTEI) -> None:
    async with sigterm_during_a_call(tei, grace_s=10, upstream_delay_s=1.5) as (server, call):
        vectors = await call  # completes despite SIGTERM
    assert len(vectors[0]) == 8
    messages = [e.get("msg") for e in server.logs()]
    assert messages.index("draining") < messages.index("stopped")


async def test_sigterm_cuts_calls_that_outlive_the_grace_period(tei: FakeTEI) -> None:
    # TEI would answer after 10 minutes and the call's deadline is 30 s: an error other than
    # DEADLINE_EXCEEDED is the grace period's cut.
    async with sigterm_during_a_call(tei, grace_s=0.5, upstream_delay_s=600) as (_, call):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DAERT_EMBEDDING_PORT": "not-a-port"}, "DAERT_EMBEDDING_PORT"),
        ({"DAERT_EMBEDDING_MAX_BATCH_SIZE": "0"}, "DAERT_EMBEDDING_MAX_BATCH_SIZE"),
        ({"DAERT_EMBEDDING_MODELS": '[{"name": "x", "backend": "tei"}]'}, "needs `url`"),
        (
            {"DAERT_EMBEDDING_MODELS": '[{"name": "x", "backend": "gpu"}]'},
            "DAERT_EMBEDDING_MODELS[0][backend]",
        ),
        ({"DAERT_EMBEDDING_MODELS": "not json"}, "DAERT_EMBEDDING_MODELS"),
    ],
)
def test_bad_configuration_stops_start_up_naming_it(env: dict[str, str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daert", "serve", "embedding"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert named in result.stderr


def test_missing_model_folder_fails_start_up() -> None:
    env = models_env({"name": "local", "path": "/nonexistent/model"})
    server = ServerProcess("embedding", env).start()
    assert server.process is not None
    assert server.process.wait(60) == 1
    assert "no model folder at /nonexistent/model" in server.log_text()
