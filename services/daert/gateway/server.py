"""`daert serve gateway`: uvicorn on the configured port, JSON logs, a graceful drain on
SIGTERM (uvicorn's own), and a separate Prometheus port like every other daert server."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from prometheus_client import start_http_server

from daert.gateway.app import create_app
from daert.gateway.config import GatewaySettings
from daert.runtime.logs import configure_logging
from daert.runtime.settings import load_settings_or_exit

log = logging.getLogger("daert.gateway")


def serve() -> int:
    settings = load_settings_or_exit(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    if not settings.dsn:
        log.error("DAERT_GATEWAY_DSN is not set: the gateway needs its API-key store")
        return 2
    if not settings.redis_url:
        log.warning("DAERT_GATEWAY_REDIS_URL is not set: rate limits are not enforced")
    # Bind first, so port 0 resolves to the port we then report.
    sock = socket.create_server((settings.host, settings.port), reuse_port=False)
    metrics_port = -1
    metrics_server = None
    if settings.metrics_port >= 0:
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = metrics_server.server_port
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.grace_period_s) or None,
        h11_max_incomplete_event_size=settings.max_receive_message_bytes,
    )
    server = uvicorn.Server(config)
    log.info("serving", extra={"http_port": sock.getsockname()[1], "metrics_port": metrics_port})
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped")
    return 0 if server.started else 1
