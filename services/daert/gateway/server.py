"""`daert serve gateway`: uvicorn on the configured port, JSON logs, a graceful drain on
SIGTERM (uvicorn's own), and a separate Prometheus port like every other daert server."""

from __future__ import annotations

import logging
import socket

import uvicorn
from prometheus_client import start_http_server

from daert.gateway.app import create_app
from daert.gateway.config import GatewaySettings
from daert.runtime.logs import configure_logging
from daert.runtime.settings import load_settings_or_exit

log = logging.getLogger("daert.gateway")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so that port 0 resolves to the port
    we report. Made with an explicit IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets
    whose protocol says TCP, and without it Nagle's algorithm and delayed ACKs hold each
    small SSE chunk back by about 40 ms."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve() -> int:
    settings = load_settings_or_exit(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    if not settings.dsn:
        log.error("DAERT_GATEWAY_DSN is not set: the gateway needs its API-key store")
        return 2
    if not settings.redis_url:
        log.warning("DAERT_GATEWAY_REDIS_URL is not set: rate limits are not enforced")
    sock = _listen(settings.host, settings.port)
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
        # uvicorn's own runner: its event loop (uvloop) and HTTP parser (httptools).
        server.run(sockets=[sock])
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped")
    return 0 if server.started else 1
