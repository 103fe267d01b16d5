"""Warm pool and sessions: where interpreters come from and how long they live."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from daert.runtime.errors import AlreadyExists, NotFound, ResourceExhausted
from daert.sandbox import drivers
from daert.sandbox.config import Limits, SandboxSettings
from daert.sandbox.interpreter import Interpreter

log = logging.getLogger("daert.sandbox")


class WarmPool:
    """Pre-started interpreters, so a call does not pay the sandbox start-up. Each is handed
    out once and never comes back: no state can pass from one caller to the next."""

    def __init__(self, settings: SandboxSettings) -> None:
        self._settings = settings
        self._ready: asyncio.Queue[Interpreter] = asyncio.Queue()
        self._taken = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self.healthy = False  # the last start of an interpreter succeeded
        self._seccomp = drivers.seccomp_filter() if settings.driver == "bubblewrap" else None

    async def new_interpreter(self) -> Interpreter:
        try:
            interpreter = await Interpreter(
                self._settings, self._settings.max_limits, self._seccomp
            ).start()
        except Exception:
            self.healthy = False
            raise
        self.healthy = True
        return interpreter

    async def start(self) -> None:
        # Fail start-up early if sandboxing is broken; the probe then is the first warm one.
        probe = await self.new_interpreter()
        if self._settings.pool_size:
            self._ready.put_nowait(probe)
        else:
            await probe.kill()
        self._filler = asyncio.create_task(self._fill(), name="sandbox-pool")

    async def _fill(self) -> None:
        while True:
            if self._ready.qsize() >= self._settings.pool_size:
                self._taken.clear()
                await self._taken.wait()
                continue
            try:
                self._ready.put_nowait(await self.new_interpreter())
            except Exception as exc:
                log.error("could not start a sandbox: %s", exc)
                await asyncio.sleep(1.0)

    async def acquire(self) -> Interpreter:
        """A warm interpreter, or a cold-started one when the pool is empty."""
        while not self._ready.empty():
            interpreter = self._ready.get_nowait()
            self._taken.set()
            if interpreter.alive:
                return interpreter
        return await self.new_interpreter()

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        while not self._ready.empty():
            await self._ready.get_nowait().kill()


@dataclass
class Session:
    session_id: str
    limits: Limits
    idle_ttl_s: float
    interpreter: Interpreter | None
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    execution_count: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.idle_ttl_s


class Sessions:
    """Open sessions: each keeps one interpreter (its state and workspace) between calls,
    until closed or idle for longer than its TTL."""

    def __init__(self, settings: SandboxSettings, pool: WarmPool) -> None:
        self._settings = settings
        self._pool = pool
        self._open: dict[str, Session] = {}
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="sandbox-session-reaper")

    def all(self) -> list[Session]:
        return list(self._open.values())

    async def create(self, session_id: str, idle_ttl_s: float, limits: Limits) -> Session:
        session_id = session_id or secrets.token_urlsafe(16)
        if session_id in self._open:
            raise AlreadyExists(f"session {session_id!r} already exists")
        if len(self._open) >= self._settings.max_sessions:
            raise ResourceExhausted(
                f"{len(self._open)} sessions are open (limit {self._settings.max_sessions}); "
                "close one or retry later"
            )
        session = Session(session_id, limits, idle_ttl_s, interpreter=None)
        self._open[session_id] = session
        try:
            session.interpreter = await self._pool.acquire()
        except BaseException:
            del self._open[session_id]
            raise
        return session

    def get(self, session_id: str) -> Session:
        session = self._open.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} does not exist (closed or expired)")
        return session

    async def close(self, session_id: str) -> bool:
        session = self._open.pop(session_id, None)
        if session is None:
            return False
        if session.interpreter is not None:
            await session.interpreter.kill()
        return True

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for session in self.all():
                if session.expires_at < now and not session.lock.locked():
                    log.info("session expired", extra={"session_id": session.session_id})
                    await self.close(session.session_id)

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session_id in list(self._open):
            await self.close(session_id)
