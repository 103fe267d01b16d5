"""The inference replicas over HTTP: health probes, and loading and unloading adapters on
vLLM through its runtime LoRA API (`POST /v1/load_lora_adapter` {"lora_name", "lora_path"},
`POST /v1/unload_lora_adapter` {"lora_name"}; the server runs with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).

LoRAX loads an adapter by its source on the first request that names it, and TGI serves the
adapters it was started with, so only vLLM replicas get load and unload calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import Counter, Gauge

from daert.lora.config import ReplicaConfig
from daert.lora.placement import EvictedState
from daert.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from daert.runtime.polling import poll_while
from daert.runtime.upstream import error_for_status, http_client, send

log = logging.getLogger("daert.lora.replicas")

REPLICA_READY = Gauge(
    "daert_lora_replica_ready",
    "1 when the replica answered its last /health probe, else 0.",
    ["replica"],
)
UNLOADS = Counter(
    "daert_lora_adapter_unloads_total",
    "Unloads of adapters the router evicted from a vLLM replica or forgot, by outcome: "
    "unloaded, not_loaded, unreachable, failed; resident_again (an evicted adapter came "
    "back before its routes there ended: not unloaded), gave_up (still in use after "
    "route_lease_s: left loaded).",
    ["replica", "outcome"],
)

_PROBE_TIMEOUT_S = 2.0


class Replica:
    """One configured replica: its HTTP client and its health as last probed."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.name = config.name
        self.client = http_client(config.url, config.timeout_s)
        self.ready: bool | None = None  # None until the first probe answers
        self.ever_ready = False
        # adapter -> the load in progress, so routes arriving meanwhile wait for it.
        self.loading: dict[str, asyncio.Task[None]] = {}
        # adapter -> the unload waiting for its routes to end, and how long it may wait
        # (time.monotonic()); a later eviction of the same adapter moves the deadline.
        self.unloading: dict[str, tuple[asyncio.Task[None], float]] = {}

    async def probe(self) -> bool:
        try:
            response = await self.client.get("/health", timeout=_PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.is_success


class ReplicaPool:
    def __init__(
        self, configs: list[ReplicaConfig], on_restart: Callable[[str], Awaitable[None]]
    ) -> None:
        self.replicas = {c.name: Replica(c) for c in configs}
        # Called with a replica's name when it answers again after failing its probes: it
        # may have restarted, so what the router thinks is resident there is forgotten.
        self._on_restart = on_restart

    def get(self, name: str) -> Replica:
        return self.replicas[name]

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(r.probe() for r in self.replicas.values()))
        for replica, ready in zip(self.replicas.values(), results, strict=True):
            if ready != replica.ready:
                log.info(
                    "replica health",
                    extra={"replica": replica.name, "ready": ready, "url": replica.config.url},
                )
            if ready and not replica.ready and replica.ever_ready:
                await self._on_restart(replica.name)
            replica.ready = ready
            replica.ever_ready = replica.ever_ready or ready
            REPLICA_READY.labels(replica.name).set(1 if ready else 0)

    async def probe_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # one failed round must not end the probing
                log.exception("replica probe round failed")
            await asyncio.sleep(interval_s)

    async def load(
        self,
        replica_name: str,
        adapter: str,
        source: str,
        on_end: Callable[[bool], Awaitable[None]],
    ) -> None:
        """Make `adapter` resident on a vLLM replica (other kinds: nothing to do). The load
        runs to its end even if the caller goes away; then `on_end` runs with whether it
        succeeded, and a failure's error, naming the adapter, its source and the replica,
        is raised."""
        replica = self.replicas[replica_name]
        if replica.config.kind != "vllm":
            return

        async def run() -> None:
            try:
                await self._load(replica, adapter, source)
            except ServiceError:
                await on_end(False)
                raise
            else:
                await on_end(True)
            finally:
                if replica.loading.get(adapter) is asyncio.current_task():
                    del replica.loading[adapter]

        task = asyncio.create_task(run())
        # Retrieved here, so a failure nobody awaits any more is not reported as lost.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        replica.loading[adapter] = task
        await asyncio.shield(task)

    async def wait_loading(self, replica_name: str, adapter: str) -> None:
        """Wait for a load of `adapter` that this process started on the replica, if one is
        in progress; raises its error if it fails."""
        task = self.replicas[replica_name].loading.get(adapter)
        if task is not None:
            await asyncio.shield(task)

    async def _load(self, replica: Replica, adapter: str, source: str) -> None:
        what = f"loading adapter {adapter!r} ({source}) on replica {replica.name!r} failed"
        try:
            await send(
                replica.client,
                "POST",
                "/v1/load_lora_adapter",
                backend=f"vLLM replica {replica.name!r}",
                url=replica.config.url,
                invalid_field="adapter",
                json={"lora_name": adapter, "lora_path": source},
            )
        except InvalidArgument as exc:
            if "already been loaded" in exc.problem:  # loaded meanwhile, e.g. by hand
                return
            raise FailedPrecondition(f"{what}: {exc.problem}") from None
        except (NotFound, FailedPrecondition) as exc:
            # A source the replica cannot find or read is the registry's problem, not the
            # caller's argument.
            raise FailedPrecondition(f"{what}: {exc.message}") from None
        except (ResourceExhausted, Unavailable) as exc:
            raise type(exc)(f"{what}: {exc.message}") from None

    def unload_when_idle(
        self,
        replica_name: str,
        adapter: str,
        state: Callable[[], Awaitable[EvictedState]],
        patience_s: float,
    ) -> None:
        """Unload an evicted adapter from a vLLM replica, in the background, once `state`
        says no route there uses it: vLLM's unload fails the requests not yet sent to it.
        Polled with backoff for `patience_s` (the lease duration, after which the routes
        that were in flight at the eviction have ended); not unloaded if the adapter is
        resident there again, or if it is still in use then (left loaded, which is
        harmless)."""
        replica = self.replicas[replica_name]
        if replica.config.kind != "vllm":
            return
        deadline = time.monotonic() + patience_s
        pending = replica.unloading.get(adapter)
        if pending is not None:  # one waiting unload per adapter: it waits longer now
            replica.unloading[adapter] = (pending[0], deadline)
            return
        task = asyncio.create_task(self._unload_when_idle(replica, adapter, state))
        replica.unloading[adapter] = (task, deadline)

        def done(task: asyncio.Task[None]) -> None:
            if replica.unloading.get(adapter, (None, 0.0))[0] is task:
                del replica.unloading[adapter]
            if not task.cancelled() and (error := task.exception()) is not None:
                log.error(
                    "waiting to unload an evicted adapter failed",
                    extra={"replica": replica.name, "adapter": adapter},
                    exc_info=error,
                )

        task.add_done_callback(done)

    async def _unload_when_idle(
        self, replica: Replica, adapter: str, state: Callable[[], Awaitable[EvictedState]]
    ) -> None:
        current = await poll_while(
            state, "in_use", lambda: replica.unloading[adapter][1], 0.05, 1.0
        )
        if current == "in_use":
            UNLOADS.labels(replica.name, "gave_up").inc()
            log.warning(
                "an evicted adapter is still in use after route_lease_s: left loaded",
                extra={"replica": replica.name, "adapter": adapter},
            )
            return
        if current == "resident":
            UNLOADS.labels(replica.name, "resident_again").inc()
            return
        await self._unload(replica, adapter)

    async def unload(self, replica_name: str, adapter: str) -> None:
        """Best effort, at once: free an adapter the router forgot on a vLLM replica (an
        unload waiting there for it is not needed any more). A failure is logged and
        counted, never raised."""
        replica = self.replicas[replica_name]
        if replica.config.kind != "vllm":
            return
        pending = replica.unloading.pop(adapter, None)
        if pending is not None:
            pending[0].cancel()
        await self._unload(replica, adapter)

    async def _unload(self, replica: Replica, adapter: str) -> None:
        try:
            response = await replica.client.post(
                "/v1/unload_lora_adapter", json={"lora_name": adapter}
            )
        except httpx.HTTPError as exc:
            outcome, detail = "unreachable", str(exc) or type(exc).__name__
        else:
            if response.is_success:
                outcome, detail = "unloaded", ""
            elif response.status_code == 404:  # not loaded there (restarted meanwhile)
                outcome, detail = "not_loaded", ""
            else:
                outcome = "failed"
                detail = error_for_status(response, "vLLM", "adapter").message
        UNLOADS.labels(replica.name, outcome).inc()
        if detail:
            log.warning(
                "unloading an adapter failed",
                extra={"replica": replica.name, "adapter": adapter, "error": detail},
            )

    async def close(self) -> None:
        for replica in self.replicas.values():
            for task in replica.loading.values():
                task.cancel()
            waiting = [task for task, _ in replica.unloading.values()]
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            with contextlib.suppress(Exception):
                await replica.client.aclose()
