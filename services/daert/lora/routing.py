"""Route: which adapter a request gets (explicit, tenant default, semantic, base model) and
which replica runs it (placement, then the adapter loaded there when it is a cold start)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from daert.lora.config import LoraSettings, ReplicaConfig
from daert.lora.model import AdapterChoice, AdapterRecord, Reason
from daert.lora.placement import Placement, PlacementState, Slot
from daert.lora.registry import AdapterRegistry
from daert.lora.replicas import ReplicaPool
from daert.lora.semantic import SemanticMatcher
from daert.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)
from daert.runtime.polling import poll_while

log = logging.getLogger("daert.lora.routing")

ROUTES = Counter("daert_lora_routes_total", "Routes decided, by reason.", ["reason"])
LOADS = Counter(
    "daert_lora_adapter_loads_total",
    "Cold starts: routes to a replica where the adapter was not resident.",
    ["replica"],
)
LOAD_FAILURES = Counter(
    "daert_lora_adapter_load_failures_total",
    "Adapter loads a vLLM replica refused or did not answer (the route failed).",
    ["replica"],
)
EVICTIONS = Counter(
    "daert_lora_adapter_evictions_total",
    "Adapters evicted from a replica to make room for another.",
    ["replica"],
)
SPILLS = Counter(
    "daert_lora_spills_total",
    "Routes sent away from an overloaded replica that held the adapter, by receiving replica.",
    ["replica"],
)
LOAD_SECONDS = Histogram(
    "daert_lora_adapter_load_seconds",
    "Time a vLLM replica took to load an adapter.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


@dataclass(frozen=True)
class Routed:
    choice: AdapterChoice
    replica: ReplicaConfig
    placement: Placement


class Router:
    def __init__(
        self,
        settings: LoraSettings,
        registry: AdapterRegistry,
        placement: PlacementState,
        pool: ReplicaPool,
        semantic: SemanticMatcher,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._placement = placement
        self._pool = pool
        self._semantic = semantic
        self._served = {r.base_model for r in settings.replicas}

    # --- which adapter ---------------------------------------------------------------------

    def base_model(self, requested: str) -> str:
        """The base model a request runs on: the one it names (INVALID_ARGUMENT when no
        replica serves it), else the router's default."""
        if requested:
            if requested not in self._served:
                raise InvalidArgument("base_model", self._not_served(requested))
            return requested
        if not self._settings.base_model:
            raise FailedPrecondition("no inference replicas are configured (DAERT_LORA_REPLICAS)")
        return self._settings.base_model

    def _not_served(self, base_model: str) -> str:
        served = ", ".join(sorted(self._served)) or "none: DAERT_LORA_REPLICAS is empty"
        return f"no replica serves base model {base_model!r} (served: {served})"

    def check_served(self, base_model: str, field: str) -> None:
        if base_model not in self._served:
            raise InvalidArgument(field, self._not_served(base_model))

    async def choose(
        self, tenant: str, requested: str, base_model: str, query: str, min_score: float
    ) -> AdapterChoice:
        """Apply the contract's rules for RouteRequest.adapter (see lora.proto)."""
        if requested == "base":
            return AdapterChoice(None, self.base_model(base_model), Reason.BASE_REQUESTED)
        if requested not in ("", "auto"):
            return await self._explicit(tenant, requested, base_model)
        base = self.base_model(base_model)
        default = await self._registry.tenant_default(tenant)
        if default is not None and default.spec.base_model != base:
            default = None  # a default applies only to requests for its base model
        if requested == "":
            if default is not None:
                return AdapterChoice(default, base, Reason.TENANT_DEFAULT)
            return AdapterChoice(None, base, Reason.BASE_REQUESTED)
        candidates = await self._registry.semantic_candidates(base, tenant)
        if not candidates:
            if default is not None:
                return AdapterChoice(default, base, Reason.TENANT_DEFAULT)
            return AdapterChoice(None, base, Reason.NO_CANDIDATES)
        best, score = await self._semantic.best(query, candidates)
        if score >= min_score:
            return AdapterChoice(best, base, Reason.SEMANTIC, score)
        if default is not None:
            return AdapterChoice(default, base, Reason.TENANT_DEFAULT, score)
        return AdapterChoice(None, base, Reason.BELOW_THRESHOLD, score)

    async def _explicit(self, tenant: str, name: str, base_model: str) -> AdapterChoice:
        adapter = await self._registry.get(name)
        if adapter is None:
            raise NotFound(f"adapter {name!r} is not registered")
        if not adapter.allows(tenant):
            raise PermissionDenied(f"tenant {tenant!r} may not use adapter {name!r}")
        if base_model and base_model != adapter.spec.base_model:
            raise InvalidArgument(
                "base_model",
                f"adapter {name!r} is for base model {adapter.spec.base_model!r}, "
                f"not {base_model!r}",
            )
        return AdapterChoice(adapter, adapter.spec.base_model, Reason.EXPLICIT)

    # --- which replica ---------------------------------------------------------------------

    async def route(self, choice: AdapterChoice) -> Routed:
        """Place the request and, on a cold start on vLLM, load the adapter there."""
        adapter = choice.adapter
        name = adapter.name if adapter else ""
        serving = [
            r
            for r in self._settings.replicas
            if r.base_model == choice.base_model
            and (r.kind != "tgi" or not name or name in r.adapters)
        ]
        if not serving:
            what = f"adapter {name!r}" if name else f"base model {choice.base_model!r}"
            raise FailedPrecondition(f"no configured replica can serve {what}")
        ready = [r for r in serving if self._pool.get(r.name).ready is not False]
        if not ready:
            down = ", ".join(f"{r.name} ({r.url})" for r in serving)
            raise Unavailable(f"no replica that can serve this request is ready: {down}")
        slots = [
            Slot(
                r.name,
                r.max_resident_adapters,
                tuple(r.adapters),
                r.timeout_s if r.kind == "vllm" else 0.0,
            )
            for r in ready
        ]
        placement = await self._placement.place(slots, name)
        replica = next(r for r in ready if r.name == placement.replica)
        if placement.spilled:
            SPILLS.labels(replica.name).inc()
        if placement.evicted:
            EVICTIONS.labels(replica.name).inc(len(placement.evicted))
        for evicted in placement.evicted:
            # Not now: routes decided for it there may not have reached the replica yet.
            self._pool.unload_when_idle(
                replica.name,
                evicted,
                functools.partial(self._placement.evicted_state, replica.name, evicted),
                self._placement.policy.lease_s,
            )
        if adapter is not None:
            await self._make_resident(adapter, replica, placement)
        ROUTES.labels(choice.reason.value).inc()
        return Routed(choice, replica, placement)

    async def _make_resident(
        self, adapter: AdapterRecord, replica: ReplicaConfig, placement: Placement
    ) -> None:
        """Have the adapter on the replica before the request goes there: load it on a cold
        start (vLLM), or wait for a load another route has under way."""
        name = adapter.name
        try:
            if placement.loaded:
                LOADS.labels(replica.name).inc()
                started = time.perf_counter()

                async def settle(ok: bool) -> None:
                    if not ok:
                        LOAD_FAILURES.labels(replica.name).inc()
                    await self._placement.finish_load(placement.route_id, name, ok)

                await self._pool.load(replica.name, name, adapter.spec.source, settle)
                if replica.kind == "vllm":
                    LOAD_SECONDS.observe(time.perf_counter() - started)
                log.info(
                    "adapter placed cold",
                    extra={
                        "adapter": name,
                        "replica": replica.name,
                        "evicted": list(placement.evicted),
                        "spilled": placement.spilled,
                    },
                )
            else:
                await self._wait_loaded(replica, name, placement)
        except (ServiceError, asyncio.CancelledError):
            # The request will not run there: its lease ends now.
            await self._placement.release(placement.route_id)
            raise

    async def _wait_loaded(self, replica: ReplicaConfig, name: str, placement: Placement) -> None:
        """A warm route waits for a load of its adapter still under way on the replica: one
        this process runs (whose error is this route's too) or, as Redis shows, another
        router's, polled until it ends or the load timeout passes."""
        await self._pool.wait_loading(replica.name, name)
        if not placement.loading:
            return
        deadline = time.monotonic() + replica.timeout_s
        state = await poll_while(
            functools.partial(self._placement.load_state, replica.name, name),
            "loading",
            lambda: deadline,
            0.02,
            0.25,
        )
        if state == "loading":
            raise Unavailable(
                f"adapter {name!r} is still loading on replica {replica.name!r} after "
                f"{replica.timeout_s:g} s (another route started the load); retry later"
            )
        if state == "gone":
            # The route that loaded it got the error; a retry loads it again.
            raise Unavailable(
                f"loading adapter {name!r} on replica {replica.name!r} failed in another "
                "route; retry to load it again"
            )

    async def release(self, route_id: str) -> bool:
        return await self._placement.release(route_id)

    async def forget(self, adapter: AdapterRecord) -> None:
        """An adapter was deleted or its weights replaced: no replica holds the old ones
        any more (vLLM replicas unload them at once, best effort)."""
        self._semantic.forget(adapter.name)
        await self._placement.forget(adapter.name, list(self._pool.replicas))
        # Every vLLM replica of its base model, not only those it is resident on: one it was
        # evicted from may still serve it (its unload waits for its routes, or failed), and
        # would take a load of new weights under the same name as "already loaded".
        serving = [
            r.name for r in self._settings.replicas if r.base_model == adapter.spec.base_model
        ]
        await asyncio.gather(*(self._pool.unload(r, adapter.name) for r in serving))
