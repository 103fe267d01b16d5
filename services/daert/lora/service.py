"""LoraRouterService: request validation and protobuf conversion. The registry lives in
`registry.py`, the adapter choice and its placement in `routing.py` and `placement.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Sequence
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from daert.lora.config import LoraSettings, ReplicaConfig
from daert.lora.model import AdapterRecord, AdapterSpec, Reason
from daert.lora.placement import PlacementState, Policy, ReplicaState, split_route_id
from daert.lora.registry import AdapterRegistry
from daert.lora.replicas import ReplicaPool
from daert.lora.routing import Router
from daert.lora.semantic import SemanticMatcher
from daert.runtime.errors import NotFound
from daert.runtime.redis_state import RedisState
from daert.runtime.validation import require
from daert.v1 import common_pb2, lora_pb2, lora_pb2_grpc

log = logging.getLogger("daert.lora")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
RESERVED_NAMES = {"auto", "base"}
# As in the retrieval service; empty is the default tenant.
TENANT_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,62})?")
# Hub ids, paths and URIs: no whitespace.
SOURCE = re.compile(r"\S{1,2048}")
BASE_MODEL = re.compile(r"\S{1,256}")
MAX_DESCRIPTION_CHARS = 4096
MAX_EXAMPLES = 100
MAX_EXAMPLE_CHARS = 2000
MAX_TENANTS = 1000
MAX_ROUTE_ID_CHARS = 128

REASONS = {
    Reason.EXPLICIT: lora_pb2.ROUTE_REASON_EXPLICIT,
    Reason.TENANT_DEFAULT: lora_pb2.ROUTE_REASON_TENANT_DEFAULT,
    Reason.SEMANTIC: lora_pb2.ROUTE_REASON_SEMANTIC,
    Reason.BELOW_THRESHOLD: lora_pb2.ROUTE_REASON_BASE_MODEL_FALLBACK_BELOW_THRESHOLD,
    Reason.NO_CANDIDATES: lora_pb2.ROUTE_REASON_BASE_MODEL_FALLBACK_NO_CANDIDATES,
    Reason.BASE_REQUESTED: lora_pb2.ROUTE_REASON_BASE_MODEL_REQUESTED,
}
KINDS = {
    "lorax": lora_pb2.REPLICA_KIND_LORAX,
    "vllm": lora_pb2.REPLICA_KIND_VLLM,
    "tgi": lora_pb2.REPLICA_KIND_TGI,
}


class LoraRouterServicer(lora_pb2_grpc.LoraRouterServiceServicer):
    def __init__(self, settings: LoraSettings) -> None:
        self._settings = settings
        self._registry = AdapterRegistry(settings)
        self._redis = (
            RedisState(
                "lora",
                settings.redis_url,
                settings.redis_password.get_secret_value() if settings.redis_password else None,
                settings.redis_timeout_s,
            )
            if settings.redis_url
            else None
        )
        policy = Policy(
            spill_factor=settings.spill_factor,
            spill_margin=settings.spill_margin,
            popularity_half_life=settings.popularity_half_life,
            lease_s=settings.route_lease_s,
        )
        self._placement = PlacementState(self._redis, policy, key_prefix=settings.redis_key_prefix)
        self._pool = ReplicaPool(settings.replicas, on_restart=self._placement.clear)
        self._semantic = SemanticMatcher(settings.embedding_model, settings.embedding_timeout_s)
        self._router = Router(settings, self._registry, self._placement, self._pool, self._semantic)
        self._probes: asyncio.Task[None] | None = None

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        lora_pb2_grpc.add_LoraRouterServiceServicer_to_server(self, server)
        return [lora_pb2.DESCRIPTOR.services_by_name["LoraRouterService"].full_name]

    async def start(self) -> None:
        if not self._settings.replicas:
            log.warning("no inference replicas configured (DAERT_LORA_REPLICAS): Route fails")
        if self._redis is None:
            log.info("no Redis configured: routing state is this process's own")
        self._probes = asyncio.create_task(
            self._pool.probe_forever(self._settings.replica_probe_interval_s)
        )
        await self._registry.start()

    async def ready(self) -> bool:
        return await self._registry.ready()

    async def close(self) -> None:
        if self._probes is not None:
            self._probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probes
        await self._pool.close()
        await self._semantic.close()
        if self._redis is not None:
            await self._redis.close()
        await self._registry.close()

    # --- registry --------------------------------------------------------------------------

    async def RegisterAdapter(
        self, request: lora_pb2.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.RegisterAdapterResponse:
        require(request.HasField("adapter"), "adapter", "is required")
        spec = _adapter_spec(request.adapter)
        self._router.check_served(spec.base_model, "adapter.base_model")
        stored, previous = await self._registry.register(spec, request.replace)
        if previous is not None and (
            previous.spec.source != spec.source or previous.spec.base_model != spec.base_model
        ):
            await self._router.forget(previous)  # replicas hold the old weights
        log.info(
            "adapter registered",
            extra={"adapter": spec.name, "base_model": spec.base_model, "replaced": bool(previous)},
        )
        return lora_pb2.RegisterAdapterResponse(adapter=_adapter_message(stored))

    async def DeleteAdapter(
        self, request: lora_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.DeleteAdapterResponse:
        deleted = await self._registry.delete(_name(request.name, "name"))
        if deleted is not None:
            await self._router.forget(deleted)
            log.info("adapter deleted", extra={"adapter": deleted.name})
        return lora_pb2.DeleteAdapterResponse(deleted=deleted is not None)

    async def ListAdapters(
        self, request: lora_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.ListAdaptersResponse:
        tenant = _tenant(request.tenant, "tenant")
        require(len(request.base_model) <= 256, "base_model", "is longer than 256 characters")
        adapters = await self._registry.list_adapters(request.base_model, tenant)
        return lora_pb2.ListAdaptersResponse(adapters=[_adapter_message(a) for a in adapters])

    async def GetAdapter(
        self, request: lora_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.GetAdapterResponse:
        name = _name(request.name, "name")
        adapter = await self._registry.get(name)
        if adapter is None:
            raise NotFound(f"adapter {name!r} is not registered")
        return lora_pb2.GetAdapterResponse(adapter=_adapter_message(adapter))

    async def SetTenantDefault(
        self, request: lora_pb2.SetTenantDefaultRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.SetTenantDefaultResponse:
        tenant = _tenant(request.tenant, "tenant")
        adapter = _name(request.adapter, "adapter") if request.adapter else ""
        previous = await self._registry.set_tenant_default(tenant, adapter)
        return lora_pb2.SetTenantDefaultResponse(previous_adapter=previous)

    async def ListTenantDefaults(
        self, request: lora_pb2.ListTenantDefaultsRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.ListTenantDefaultsResponse:
        defaults = await self._registry.tenant_defaults()
        return lora_pb2.ListTenantDefaultsResponse(
            defaults=[lora_pb2.TenantDefault(tenant=t, adapter=a) for t, a in defaults]
        )

    # --- routing ---------------------------------------------------------------------------

    async def Route(
        self, request: lora_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.RouteResponse:
        tenant = _tenant(request.tenant, "tenant")
        requested = request.adapter
        if requested not in ("", "auto", "base"):
            _name(requested, "adapter")
        require(
            not request.base_model or BASE_MODEL.fullmatch(request.base_model) is not None,
            "base_model",
            "must be 1 to 256 characters without whitespace",
        )
        for i, message in enumerate(request.messages):
            require(
                message.role != common_pb2.ROLE_UNSPECIFIED,
                f"messages[{i}].role",
                "must be set (system, user, assistant or tool)",
            )
        min_score = self._settings.min_score
        if request.HasField("min_score"):
            min_score = request.min_score
            require(
                math.isfinite(min_score) and -1 <= min_score <= 1,
                "min_score",
                "must be between -1 and 1",
            )
        query = _query_text(request.messages, self._settings.max_query_chars)
        if requested == "auto":
            require(bool(query), "messages", '"auto" routing needs a message with text')
        choice = await self._router.choose(tenant, requested, request.base_model, query, min_score)
        routed = await self._router.route(choice)
        replica, placement = routed.replica, routed.placement
        response = lora_pb2.RouteResponse(
            adapter_id=choice.adapter.name if choice.adapter else "",
            adapter_source=choice.adapter.spec.source if choice.adapter else "",
            replica=_replica_message(replica),
            reason=REASONS[choice.reason],
            loaded=placement.loaded,
            route_id=placement.route_id,
            base_model=choice.base_model,
        )
        if choice.score is not None:
            response.score = choice.score
        return response

    async def ReleaseRoute(
        self, request: lora_pb2.ReleaseRouteRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.ReleaseRouteResponse:
        route_id = request.route_id
        require(bool(route_id), "route_id", "is required")
        require(
            len(route_id) <= MAX_ROUTE_ID_CHARS and split_route_id(route_id) is not None,
            "route_id",
            "is not a route_id returned by Route",
        )
        return lora_pb2.ReleaseRouteResponse(released=await self._router.release(route_id))

    async def ListReplicas(
        self, request: lora_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.ListReplicasResponse:
        replicas = sorted(
            (
                r
                for r in self._settings.replicas
                if not request.base_model or r.base_model == request.base_model
            ),
            key=lambda r: r.name,
        )
        states = await self._placement.states([r.name for r in replicas])
        return lora_pb2.ListReplicasResponse(
            replicas=[self._replica_status(r, states.get(r.name, ReplicaState())) for r in replicas]
        )

    def _replica_status(
        self, replica: ReplicaConfig, state: ReplicaState
    ) -> lora_pb2.ReplicaStatus:
        return lora_pb2.ReplicaStatus(
            replica=_replica_message(replica),
            # TGI's adapters are fixed at its start; the placement never records them.
            resident_adapters=replica.adapters or state.resident,
            in_flight=state.in_flight,
            max_resident_adapters=replica.max_resident_adapters,
            ready=self._pool.get(replica.name).ready is True,
        )


# --- validation and conversion ---------------------------------------------------------------


def _name(name: str, field: str) -> str:
    require(bool(name), field, "is required")
    require(
        ADAPTER_NAME.fullmatch(name) is not None,
        field,
        "must be 1 to 128 characters of letters, digits, '.', '_' and '-'",
    )
    require(name.lower() not in RESERVED_NAMES, field, f"{name!r} is reserved for routing")
    return name


def _tenant(tenant: str, field: str) -> str:
    require(
        TENANT_NAME.fullmatch(tenant) is not None,
        field,
        "must be up to 63 letters, digits, '_' and '-', starting with a letter or digit",
    )
    return tenant


def _adapter_spec(adapter: lora_pb2.Adapter) -> AdapterSpec:
    name = _name(adapter.name, "adapter.name")
    require(bool(adapter.source.strip()), "adapter.source", "is required")
    require(
        SOURCE.fullmatch(adapter.source) is not None,
        "adapter.source",
        "must be a Hub id, path or URI of up to 2048 characters without whitespace",
    )
    require(bool(adapter.base_model.strip()), "adapter.base_model", "is required")
    require(
        BASE_MODEL.fullmatch(adapter.base_model) is not None,
        "adapter.base_model",
        "must be up to 256 characters without whitespace",
    )
    require(
        len(adapter.description) <= MAX_DESCRIPTION_CHARS,
        "adapter.description",
        f"is longer than {MAX_DESCRIPTION_CHARS} characters",
    )
    require(
        len(adapter.examples) <= MAX_EXAMPLES,
        "adapter.examples",
        f"has more than {MAX_EXAMPLES} entries",
    )
    for i, example in enumerate(adapter.examples):
        field = f"adapter.examples[{i}]"
        require(bool(example.strip()), field, "must not be blank")
        require(len(example) <= MAX_EXAMPLE_CHARS, field, f"is longer than {MAX_EXAMPLE_CHARS}")
    require(
        len(adapter.tenants) <= MAX_TENANTS,
        "adapter.tenants",
        f"has more than {MAX_TENANTS} entries",
    )
    for i, tenant in enumerate(adapter.tenants):
        field = f"adapter.tenants[{i}]"
        require(bool(tenant), field, "must not be empty (an empty list allows every tenant)")
        _tenant(tenant, field)
    return AdapterSpec(
        name=name,
        source=adapter.source,
        base_model=adapter.base_model,
        description=adapter.description,
        examples=tuple(adapter.examples),
        tenants=tuple(dict.fromkeys(adapter.tenants)),  # in order, without repeats
    )


def _query_text(messages: Sequence[common_pb2.ChatMessage], max_chars: int) -> str:
    """What "auto" compares with the adapters: the last user message with text (else the
    last message with text), its end kept when it is long."""
    with_text = [m for m in messages if m.content.strip()]
    users = [m for m in with_text if m.role == common_pb2.ROLE_USER]
    chosen = (users or with_text)[-1:]
    return chosen[0].content.strip()[-max_chars:] if chosen else ""


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _adapter_message(adapter: AdapterRecord) -> lora_pb2.Adapter:
    spec = adapter.spec
    return lora_pb2.Adapter(
        name=spec.name,
        source=spec.source,
        base_model=spec.base_model,
        description=spec.description,
        examples=spec.examples,
        tenants=spec.tenants,
        created_at=_timestamp(adapter.created_at),
        updated_at=_timestamp(adapter.updated_at),
    )


def _replica_message(replica: ReplicaConfig) -> lora_pb2.Replica:
    return lora_pb2.Replica(
        name=replica.name, url=replica.url, kind=KINDS[replica.kind], base_model=replica.base_model
    )
