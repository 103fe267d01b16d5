"""Run one service: a grpc.aio server with health, reflection, metrics and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from daert.runtime.interceptors import RpcInterceptor
from daert.runtime.logs import configure_logging
from daert.runtime.metrics import BACKEND_READY
from daert.runtime.registry import load_spec
from daert.runtime.service import Service
from daert.runtime.settings import ServerSettings, load_settings_or_exit

log = logging.getLogger("daert.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A health "service" that is SERVING for as long as the process answers, whatever its
# backends: a liveness probe asks for it, so a database outage takes pods out of their
# Service (readiness) without restarting them.
LIVENESS_SERVICE = "liveness"


class _Readiness:
    """Keeps grpc.health.v1 in step with the service's backends: NOT_SERVING until they are
    ready, and again whenever a periodic check finds one lost."""

    def __init__(
        self, service: Service, servicer: health.aio.HealthServicer, names: Sequence[str]
    ) -> None:
        self._service = service
        self._servicer = servicer
        self._names = ["", *names]  # "" is the whole server, as Kubernetes probes ask
        self._recheck = asyncio.Event()
        self._ready: bool | None = None

    def recheck_now(self) -> None:
        self._recheck.set()

    async def _set(self, ready: bool, service_label: str) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        BACKEND_READY.labels(service_label).set(1 if ready else 0)
        log.info("health", extra={"status": "SERVING" if ready else "NOT_SERVING"})
        for name in self._names:
            await self._servicer.set(name, SERVING if ready else NOT_SERVING)

    async def run(self, interval_s: float, service_label: str) -> None:
        await self._set(False, service_label)
        # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow this
        # task's cancellation when the awaited thing completes at the same moment (as the
        # recheck event does when start-up fails), and shutdown then waits forever.
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    ready = await self._service.ready()
            except Exception as exc:  # a failing check means "not ready", never a crash
                log.warning("readiness check failed: %s", str(exc) or type(exc).__name__)
                ready = False
            await self._set(ready, service_label)
            self._recheck.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._recheck.wait()


async def run_server(name: str, service: Service, settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    server = grpc.aio.server(
        interceptors=[RpcInterceptor(name)],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            # Fail loudly if the port is taken instead of silently sharing it.
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(service.add_to_server(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    metrics_server = None
    metrics_port = -1
    if settings.metrics_port >= 0:
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = metrics_server.server_port

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.start()
    await health_servicer.set(LIVENESS_SERVICE, SERVING)
    log.info("serving", extra={"grpc_port": port, "metrics_port": metrics_port})
    readiness = _Readiness(service, health_servicer, names)
    readiness_task = asyncio.create_task(readiness.run(settings.health_interval_s, name))
    start_task = asyncio.create_task(service.start())
    start_task.add_done_callback(lambda _: readiness.recheck_now())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    if start_task.done() and start_task.exception() is not None:
        log.error("start-up failed", exc_info=start_task.exception())
        exit_code = 1
    else:
        await stop_task
        log.info("draining", extra={"grace_period_s": settings.grace_period_s})

    # Drain: report NOT_SERVING so load balancers stop sending, refuse new RPCs, let
    # in-flight ones finish within the grace period, then release the backends.
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_period_s)
    for task in (readiness_task, start_task, stop_task):
        task.cancel()
    await asyncio.gather(readiness_task, start_task, stop_task, return_exceptions=True)
    await service.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return exit_code


def serve(name: str) -> int:
    """Entry point of `daert serve <name>`."""
    spec = load_spec(name)
    settings = load_settings_or_exit(spec.settings)
    configure_logging(name, settings.log_level)
    service = spec.create(settings)
    return asyncio.run(run_server(name, service, settings))
