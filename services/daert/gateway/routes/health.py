"""/healthz (the process answers), /readyz (the services it needs answer), /metrics."""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daert.clients import ServiceClient
from daert.gateway.state import gateway

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _serving(client: ServiceClient) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=_CHECK_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 when the key store and every required service answer; the others are reported
    (a gateway without, say, the LoRA router still serves the base models)."""
    state = gateway(request)
    clients = state.clients.by_name()
    names = list(clients)
    statuses = await asyncio.gather(*(_serving(clients[n]) for n in names))
    services = dict(zip(names, statuses, strict=True))
    key_store = "SERVING" if await state.keys.ping() else "UNAVAILABLE"
    ready = key_store == "SERVING" and all(
        services[name] == "SERVING" for name in state.settings.required_services
    )
    body = {
        "status": "ready" if ready else "not ready",
        "required": state.settings.required_services,
        "services": services,
        "key_store": key_store,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
