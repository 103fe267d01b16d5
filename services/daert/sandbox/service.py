"""SandboxService: request validation and wiring; isolation lives in drivers.py and agent.py."""

from __future__ import annotations

import base64
import logging
import mimetypes
import posixpath
import shutil
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from daert.runtime.errors import ResourceExhausted
from daert.runtime.validation import require
from daert.sandbox.config import Limits, SandboxSettings
from daert.sandbox.interpreter import Execution
from daert.sandbox.pool import Session, Sessions, WarmPool
from daert.v1 import sandbox_pb2, sandbox_pb2_grpc

log = logging.getLogger("daert.sandbox")


def _relative_path(path: str, field: str) -> str:
    """A path inside the workspace: relative, normalised, never escaping it."""
    require(bool(path), field, "must not be empty")
    require("\x00" not in path, field, "must not contain NUL")
    normal = posixpath.normpath(path)
    require(
        not posixpath.isabs(path) and normal not in (".", "..") and not normal.startswith("../"),
        field,
        f"{path!r} must name a file inside the workspace",
    )
    return normal


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, settings: SandboxSettings) -> None:
        self._settings = settings
        self._pool = WarmPool(settings)
        self._sessions = Sessions(settings, self._pool)
        self._running = 0

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(self, server)
        return [sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name]

    async def start(self) -> None:
        if self._settings.driver == "bubblewrap" and shutil.which("bwrap") is None:
            raise RuntimeError("driver bubblewrap needs `bwrap` (Debian package bubblewrap)")
        await self._pool.start()
        self._sessions.start()

    async def ready(self) -> bool:
        return self._pool.healthy

    async def close(self) -> None:
        await self._sessions.close_all()
        await self._pool.close()

    # --- RPCs ------------------------------------------------------------------------------

    async def Execute(
        self, request: sandbox_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.ExecuteResponse:
        code_bytes = len(request.code.encode())
        require(bool(request.code.strip()), "code", "must not be empty")
        require(
            code_bytes <= self._settings.max_code_bytes,
            "code",
            f"{code_bytes} bytes; at most {self._settings.max_code_bytes}",
        )
        files = self._validated_files(request.files)
        output_paths = [
            _relative_path(p, f"output_paths[{i}]") for i, p in enumerate(request.output_paths)
        ]
        session = self._sessions.get(request.session_id) if request.session_id else None
        ceiling = session.limits if session else self._settings.max_limits
        limits = self._limits(request.limits if request.HasField("limits") else None, ceiling)

        if self._running >= self._settings.max_concurrent:
            raise ResourceExhausted(
                f"{self._running} executions running (limit {self._settings.max_concurrent}); "
                "retry with backoff"
            )
        self._running += 1
        try:
            if session is None:
                result = await self._run_once(request.code, files, output_paths, limits)
                reset = False
            else:
                result, reset = await self._run_in_session(
                    session, request.code, files, output_paths, limits
                )
        finally:
            self._running -= 1
        return self._response(result, session, reset)

    async def CreateSession(
        self, request: sandbox_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.CreateSessionResponse:
        if request.session_id:
            require(
                len(request.session_id) <= 128 and request.session_id.isprintable(),
                "session_id",
                "at most 128 printable characters",
            )
        ttl = self._settings.session_idle_ttl_s
        if request.HasField("idle_ttl"):
            ttl = request.idle_ttl.ToNanoseconds() / 1e9
            require(
                0 < ttl <= self._settings.max_session_idle_ttl_s,
                "idle_ttl",
                f"must be positive and at most {self._settings.max_session_idle_ttl_s:.0f}s",
            )
        limits = self._limits(
            request.limits if request.HasField("limits") else None, self._settings.max_limits
        )
        session = await self._sessions.create(request.session_id, ttl, limits)
        return sandbox_pb2.CreateSessionResponse(
            session_id=session.session_id,
            expires_at=_timestamp(session.expires_at),
            idle_ttl=_duration(ttl),
        )

    async def CloseSession(
        self, request: sandbox_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.CloseSessionResponse:
        require(bool(request.session_id), "session_id", "must not be empty")
        return sandbox_pb2.CloseSessionResponse(
            closed=await self._sessions.close(request.session_id)
        )

    async def ListSessions(
        self, request: sandbox_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> sandbox_pb2.ListSessionsResponse:
        return sandbox_pb2.ListSessionsResponse(
            sessions=[
                sandbox_pb2.SandboxSession(
                    session_id=s.session_id,
                    created_at=_timestamp(s.created_at),
                    last_used_at=_timestamp(s.last_used_at),
                    expires_at=_timestamp(s.expires_at),
                    idle_ttl=_duration(s.idle_ttl_s),
                    execution_count=s.execution_count,
                    busy=s.lock.locked(),
                    limits=sandbox_pb2.SandboxLimits(**s.limits.model_dump()),
                )
                for s in self._sessions.all()
            ]
        )

    # --- helpers ---------------------------------------------------------------------------

    def _limits(self, given: sandbox_pb2.SandboxLimits | None, ceiling: Limits) -> Limits:
        """The request's limits: 0 takes the default, anything above the ceiling (the server
        maximum, or the session's own limits) is rejected, never quietly lowered."""
        values: dict[str, int] = {}
        for name, default in self._settings.default_limits.model_dump().items():
            asked = getattr(given, name) if given is not None else 0
            top = getattr(ceiling, name)
            require(asked >= 0, f"limits.{name}", "must not be negative")
            require(asked <= top, f"limits.{name}", f"{asked} exceeds the maximum {top}")
            values[name] = asked or min(default, top)
        return Limits(**values)

    def _validated_files(self, files: Sequence[sandbox_pb2.SandboxFile]) -> list[dict[str, Any]]:
        require(
            len(files) <= self._settings.max_input_files,
            "files",
            f"{len(files)} files; at most {self._settings.max_input_files}",
        )
        total = sum(len(f.content) for f in files)
        require(
            total <= self._settings.max_input_bytes,
            "files",
            f"{total} bytes; at most {self._settings.max_input_bytes}",
        )
        return [
            {
                "path": _relative_path(f.path, f"files[{i}].path"),
                "content": f.content,
                "mode": f.mode if f.HasField("mode") else None,
            }
            for i, f in enumerate(files)
        ]

    async def _run_once(
        self, code: str, files: list[dict[str, Any]], paths: list[str], limits: Limits
    ) -> Execution:
        interpreter = await self._pool.acquire()
        try:
            return await interpreter.execute(code, files, paths, limits, hard_limits=limits)
        finally:
            await interpreter.kill()  # one-shot: nothing survives the call

    async def _run_in_session(
        self,
        session: Session,
        code: str,
        files: list[dict[str, Any]],
        paths: list[str],
        limits: Limits,
    ) -> tuple[Execution, bool]:
        async with session.lock:
            reset = False
            if session.interpreter is None or not session.interpreter.alive:
                # A loss already reported left None; one that died between calls (killed from
                # outside) is reported now, once.
                reset = session.interpreter is not None
                session.interpreter = await self._pool.acquire()
            result = await session.interpreter.execute(
                code, files, paths, limits, hard_limits=session.limits
            )
            session.execution_count += 1
            session.last_used_at = time.time()
            if result.interpreter_lost:
                reset = True
                await session.interpreter.kill()
                session.interpreter = None
            return result, reset

    @staticmethod
    def _response(
        result: Execution, session: Session | None, reset: bool
    ) -> sandbox_pb2.ExecuteResponse:
        response = sandbox_pb2.ExecuteResponse(
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            memory_exceeded=result.memory_exceeded,
            duration_ms=result.duration_ms,
            cpu_time_ms=result.cpu_time_ms,
            peak_memory_bytes=result.peak_memory_bytes,
            session_id=session.session_id if session else "",
            session_reset=reset,
            outputs=[
                sandbox_pb2.RichOutput(mime_type=o["mime_type"], data=base64.b64decode(o["data"]))
                for o in result.outputs
            ],
            files=[
                sandbox_pb2.SandboxOutputFile(
                    path=f["path"],
                    content=base64.b64decode(f["content"]),
                    size=f["size"],
                    truncated=f["truncated"],
                    omitted=f["omitted"],
                    mime_type=mimetypes.guess_type(f["path"])[0] or "",
                )
                for f in result.files
            ],
        )
        if result.error:
            response.error.CopyFrom(sandbox_pb2.ExecutionError(**result.error))
        return response
