"""Shared machinery for the fake embedding backends (:mod:`.tei`, :mod:`.ollama`).

A :class:`FakeHTTPServer` is an aiohttp application served on ``127.0.0.1`` (port 0, so
the OS picks a free port) from a background thread that owns its own event loop. It can
therefore be used from sync tests, from async tests running on another loop, and as the
upstream of a server subprocess under test (point the subprocess at :attr:`url`).

What the base gives every fake:

* ``requests``: every request, recorded on arrival as ``(method, path, json, headers)``
  (``json`` is ``None`` when the body is empty or not JSON; header names are lower-cased).
* ``delay_s``: seconds an *inference* request (``POST`` to one of the subclass'
  ``inference_paths``) sleeps before it is answered. Read continuously while sleeping, so
  lowering it releases requests that are already waiting. Health/info/tag routes are never
  delayed, so background health probes keep working while a test stalls inference.
* ``fail_next(status, body, times)``: queue canned error responses for the next inference
  requests (after the delay, so "slow failure" is testable too).
* ``answer_with(path, status, text, content_type)``: answer every request to ``path``,
  any route, with this body until :meth:`reset`, as a proxy in front of the server might
  (an HTML page with 200, say).
* ``disconnects``: requests whose client went away before the response was sent. aiohttp
  only cancels a handler on client disconnect when the server is built with
  ``handler_cancellation=True`` (opt-in since aiohttp 3.9), which :meth:`start` does; the
  middleware counts the resulting :class:`asyncio.CancelledError`. ``last_disconnect_at``
  is the :func:`time.monotonic` time of the latest one. Handlers that see the client go
  away some other way (a streaming write failing) count it with :meth:`_record_disconnect`;
  a handler that drops the connection itself marks the request with
  :data:`SERVER_DROPPED`, so its own cancellation is not counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

import numpy as np
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Large enough that the fakes, not aiohttp (default 1 MiB), decide what is too big.
_CLIENT_MAX_SIZE = 64 * 1024 * 1024

#: Request key a handler sets when it closed the connection on purpose (not a disconnect).
SERVER_DROPPED = web.RequestKey("fake_server_dropped", bool)


class RecordedRequest(NamedTuple):
    """One request as the fake received it."""

    method: str
    path: str
    json: Any
    headers: dict[str, str]


class FakeHTTPServer:
    """Base class: lifecycle, recording, delay, queued failures, disconnect counting."""

    #: ``POST`` paths that count as inference (delayed, failable). Set by subclasses.
    inference_paths: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.delay_s: float = 0.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._failures: deque[tuple[int, Mapping[str, Any] | str]] = deque()
        self._overrides: dict[str, tuple[int, str, str]] = {}
        self._disconnects = 0
        self._last_disconnect_at: float | None = None
        self._in_flight = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Start serving; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._stopping = False
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"{type(self).__name__}-loop", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop serving (idempotent). In-flight requests are cut off, not counted."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=10)
            self._runner = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = None
        self._thread = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _astart(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=_CLIENT_MAX_SIZE)
        self._add_routes(app)
        # handler_cancellation=True: cancel the handler task when the client disconnects
        # (aiohttp >= 3.9 no longer does this by default). shutdown_timeout: do not wait
        # the default 60 s for requests a test left sleeping.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    def _add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of all requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Recorded requests for one path."""
        return [r for r in self.requests if r.path == path]

    @property
    def disconnects(self) -> int:
        with self._lock:
            return self._disconnects

    @property
    def last_disconnect_at(self) -> float | None:
        """:func:`time.monotonic` when the latest disconnect was counted (None: none yet)."""
        with self._lock:
            return self._last_disconnect_at

    @property
    def in_flight(self) -> int:
        """Requests currently being handled."""
        with self._lock:
            return self._in_flight

    # ------------------------------------------------------------------ controls
    def fail_next(self, status: int, body: Mapping[str, Any] | str, times: int = 1) -> None:
        """Answer the next ``times`` inference requests with ``status`` and ``body``.

        A mapping is sent as JSON, a string as ``text/plain``.
        """
        with self._lock:
            self._failures.extend([(status, body)] * times)

    def answer_with(
        self, path: str, status: int, text: str, content_type: str = "text/html"
    ) -> None:
        """Answer every request to ``path`` with ``status`` and ``text`` until :meth:`reset`."""
        with self._lock:
            self._overrides[path] = (status, text, content_type)

    def reset(self) -> None:
        """Forget recorded requests, queued failures, overrides and counters; clear the
        delay."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._overrides.clear()
            self._disconnects = 0
            self._last_disconnect_at = None
            self.delay_s = 0.0

    def wait_for_disconnects(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` disconnects were counted; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._disconnects >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0, path: str | None = None) -> bool:
        """Block until ``n`` requests (to ``path``, if given) arrived; False on timeout."""

        def enough() -> bool:
            return sum(1 for r in self._requests if path is None or r.path == path) >= n

        with self._changed:
            return self._changed.wait_for(enough, timeout)

    # ----------------------------------------------------------------- internals
    def _record_disconnect(self) -> None:
        """Count a client that went away mid-request (no-op while the server stops)."""
        if self._stopping:
            return
        with self._changed:
            self._disconnects += 1
            self._last_disconnect_at = time.monotonic()
            self._changed.notify_all()

    async def _simulate_latency(self) -> None:
        """Sleep while ``delay_s`` says so.

        ``delay_s`` is a plain attribute set from other threads, so it is polled (every
        10 ms) rather than awaited: a test can shorten or end a delay already under way.
        """
        start = time.monotonic()
        while (remaining := self.delay_s - (time.monotonic() - start)) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(remaining, 0.01))

    def _is_inference(self, request: web.Request) -> bool:
        return request.method == "POST" and request.path in self.inference_paths

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(
            request.method, request.path, body, {k.lower(): v for k, v in request.headers.items()}
        )
        with self._changed:
            self._requests.append(recorded)
            self._in_flight += 1
            self._changed.notify_all()
        try:
            with self._lock:
                override = self._overrides.get(request.path)
            if override is not None:
                status, text, content_type = override
                return web.Response(status=status, text=text, content_type=content_type)
            if self._is_inference(request):
                with self._lock:
                    failure = self._failures.popleft() if self._failures else None
                if failure is not None:
                    await self._simulate_latency()
                    status, payload = failure
                    if isinstance(payload, str):
                        return web.Response(status=status, text=payload)
                    return web.json_response(dict(payload), status=status)
            return await handler(request)
        except asyncio.CancelledError:
            # aiohttp cancels the handler task when the peer closes the connection.
            if not request.get(SERVER_DROPPED):
                self._record_disconnect()
            raise
        finally:
            with self._lock:
                self._in_flight -= 1


def f32_wire(values: Any) -> list[float]:
    """Floats as a float32 JSON encoder puts them on the wire.

    Both backends serialise ``f32`` with the shortest round-tripping representation
    (serde_json for TEI, Go's encoding/json for ``[]float32`` in Ollama), e.g.
    ``0.010071029``. ``str(numpy.float32)`` produces the same digits; parsing them back
    gives exactly the float64 a JSON client sees, so fakes and tests compare exactly.
    """
    return [float(str(np.float32(v))) for v in values]


def stable_seed(*parts: str) -> int:
    """A process-independent 64-bit seed (unlike the salted built-in ``hash``)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")
