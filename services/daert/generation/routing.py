"""Where a request goes: the model's own server, or, for a LoRA adapter on a model with
`adapters: router`, the replica the LoRA router chooses.

Each kind of server takes the adapter its own way: LoRAX in `parameters.adapter_id` (the
adapter's source, which it loads on demand) with `parameters.adapter_source` saying where
that source is; TGI in `parameters.adapter_id` too, but by the name it was started with
(LORA_ADAPTERS, named as registered); an OpenAI-compatible server (vLLM) as the `model` (the
adapter's name, under which the router loaded it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from daert.clients import LoraRouterClient
from daert.generation.backends import GenerationBackend, UpstreamCall, create_backend
from daert.generation.config import BackendKind, ModelConfig
from daert.generation.request import GenerationInput
from daert.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)
from daert.v1 import common_pb2, generation_pb2, lora_pb2

log = logging.getLogger("daert.generation")

AUTO = "auto"

_REPLICA_BACKENDS: dict[int, BackendKind] = {
    lora_pb2.REPLICA_KIND_VLLM: "openai",
    lora_pb2.REPLICA_KIND_LORAX: "tgi",
    lora_pb2.REPLICA_KIND_TGI: "tgi",
}
_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
# Router answers passed on to the caller with the same meaning.
_ROUTER_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


@dataclass(frozen=True)
class Target:
    backend: GenerationBackend
    call: UpstreamCall
    adapter_id: str  # the adapter actually used; empty for the base model
    replica: str  # the server's name: the router's replica, else the model's name
    route_id: str = ""  # the router's lease, released when the generation ends


class Targets:
    def __init__(self) -> None:
        self._router: LoraRouterClient | None = None
        self._replicas: dict[tuple[str, str, str], GenerationBackend] = {}
        self._releases: set[asyncio.Task[None]] = set()

    async def resolve(
        self,
        config: ModelConfig,
        backend: GenerationBackend,
        request: GenerationInput,
        adapter: str,
        tenant: str,
    ) -> Target:
        if not adapter or config.adapters == "none":
            if adapter:
                raise InvalidArgument("adapter_id", f"model {config.name!r} takes no LoRA adapters")
            return Target(backend, UpstreamCall(request, config.upstream_name), "", config.name)
        if config.adapters == "direct":
            if adapter == AUTO:
                raise InvalidArgument(
                    "adapter_id",
                    f'"auto" needs the LoRA router; model {config.name!r} takes adapter names '
                    "directly",
                )
            return Target(backend, _with_adapter(config, backend, request, adapter), adapter,
                          config.name)  # fmt: skip
        return await self._route(config, request, adapter, tenant)

    async def _route(
        self, config: ModelConfig, request: GenerationInput, adapter: str, tenant: str
    ) -> Target:
        if self._router is None:
            self._router = LoraRouterClient(timeout_s=10.0)
        messages = [
            common_pb2.ChatMessage(role=_ROLES[m.role], content=m.content)
            for m in request.messages or ()
        ] or [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.prompt or "")]
        try:
            route = await self._router.stub.Route(
                lora_pb2.RouteRequest(
                    messages=messages,
                    tenant=tenant,
                    adapter=adapter,
                    base_model=config.router_base_model,
                )
            )
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("adapter_id", f"LoRA router: {details}") from exc
            error = _ROUTER_ERRORS.get(code, Unavailable)
            raise error(f"LoRA router at {self._router.target}: {details}") from exc
        replica = route.replica
        kind = _REPLICA_BACKENDS.get(replica.kind)
        if kind is None:
            raise Unavailable(f"LoRA router chose replica {replica.name!r} of unknown kind")
        backend = self._replica_backend(config, replica, kind)
        if route.adapter_id and replica.kind == lora_pb2.REPLICA_KIND_LORAX:
            adapter_id, source = _lorax_adapter(route.adapter_source or route.adapter_id)
            call = UpstreamCall(
                request, config.upstream_name, adapter=adapter_id, adapter_source=source
            )
        else:
            call = _with_adapter(config, backend, request, route.adapter_id)
        return Target(backend, call, route.adapter_id, replica.name, route.route_id)

    def _replica_backend(
        self, config: ModelConfig, replica: lora_pb2.Replica, kind: BackendKind
    ) -> GenerationBackend:
        key = (replica.name, replica.url, kind)
        if key not in self._replicas:
            self._replicas[key] = create_backend(config, kind, replica.url)
        return self._replicas[key]

    def release(self, target: Target) -> None:
        """Tell the router the route is done, without holding up the caller (and even when
        the caller's task is being cancelled)."""
        if not target.route_id or self._router is None:
            return
        task = asyncio.create_task(self._release(target.route_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, route_id: str) -> None:
        assert self._router is not None
        try:
            await self._router.stub.ReleaseRoute(lora_pb2.ReleaseRouteRequest(route_id=route_id))
        except grpc.aio.AioRpcError as exc:  # the lease expires on its own
            log.warning("could not release a LoRA route", extra={"error": exc.details()})

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=2.0)
        await asyncio.gather(*(b.close() for b in self._replicas.values()))
        if self._router is not None:
            await self._router.close()


def _lorax_adapter(source: str) -> tuple[str, str]:
    """LoRAX's `adapter_id` and `adapter_source` for a registered source: an s3:// URI is
    "s3", a path on the replica (absolute, or a file:// URI) "local", anything else a Hub
    id ("hub", LoRAX's default)."""
    if source.startswith("s3://"):
        return source, "s3"
    if source.startswith("file://"):
        return source.removeprefix("file://"), "local"
    if source.startswith("/"):
        return source, "local"
    return source, "hub"


def _with_adapter(
    config: ModelConfig, backend: GenerationBackend, request: GenerationInput, name: str
) -> UpstreamCall:
    """The call naming adapter `name` as the server knows it: TGI's `adapter_id` (its
    LORA_ADAPTERS name), an OpenAI-compatible server's `model`."""
    if not name:  # the router chose the base model
        return UpstreamCall(request, config.upstream_name)
    if backend.kind == generation_pb2.GENERATION_BACKEND_TGI:
        return UpstreamCall(request, config.upstream_name, adapter=name)
    return UpstreamCall(request, model=name)
