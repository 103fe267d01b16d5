"""One sandboxed interpreter: the agent process, its pipes, and one execution at a time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from daert.sandbox import drivers
from daert.sandbox.config import Limits, SandboxSettings

log = logging.getLogger("daert.sandbox")

_slots = itertools.count()
START_TIMEOUT_S = 30.0
# After the agent's answer, its end-of-output markers are already in the pipes.
MARKER_GRACE_S = 1.0


@dataclass
class Execution:
    """What one run produced, before it becomes an ExecuteResponse."""

    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    memory_exceeded: bool = False
    duration_ms: int = 0
    cpu_time_ms: int = 0
    peak_memory_bytes: int = 0
    error: dict[str, str] | None = None
    outputs: list[dict[str, str]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    interpreter_lost: bool = False  # the interpreter died; a session must start afresh


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Capture:
    """One call's output on one stream: kept up to a byte limit (the rest is drained and
    dropped, with a flag) until the call's end marker or end of stream. What was read stays
    available if reading is given up (the code closed the stream and never wrote a marker)."""

    def __init__(self, stream: asyncio.StreamReader, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._kept = bytearray()
        self._pending = b""  # may hold the start of a marker split across reads
        self.truncated = False

    def _commit(self, data: bytes) -> None:
        room = self._limit - len(self._kept)
        self.truncated = self.truncated or len(data) > room
        self._kept.extend(data[: max(room, 0)])

    async def until(self, marker: bytes) -> None:
        while chunk := await self._stream.read(65536):
            window = self._pending + chunk
            end = window.find(marker)
            if end >= 0:
                self._pending = b""
                self._commit(window[:end])
                return
            keep = len(marker) - 1
            self._commit(window[:-keep])
            self._pending = window[-keep:]

    @property
    def output(self) -> bytes:
        pending = self._pending[: max(self._limit - len(self._kept), 0)]
        return bytes(self._kept) + pending


class Interpreter:
    """A started agent inside its sandbox, waiting for code. Never shared between callers
    that do not share a session."""

    def __init__(
        self, settings: SandboxSettings, limits: Limits, seccomp: bytes | None = None
    ) -> None:
        self._settings = settings
        self._seccomp = seccomp  # the BPF program bubblewrap installs
        self.limits = limits  # the hard limits it was started with
        self._process: asyncio.subprocess.Process | None = None
        self._control_in: int | None = None
        self._control_out: asyncio.StreamReader | None = None
        self._workdir: str | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> Interpreter:
        loop = asyncio.get_running_loop()
        to_agent_r, to_agent_w = os.pipe()
        from_agent_r, from_agent_w = os.pipe()
        uid = drivers.sandbox_uid(self._settings, next(_slots) % 50_000)
        fds = (to_agent_r, from_agent_w)
        passed = list(fds)
        if self._settings.driver == "bubblewrap":
            assert self._seccomp is not None
            seccomp_r, seccomp_w = os.pipe()  # the program is small: fits the pipe buffer
            os.write(seccomp_w, self._seccomp)
            os.close(seccomp_w)
            agent = drivers.agent_source()
            passed += [seccomp_r, agent]
            launch = drivers.bubblewrap(self._settings, self.limits, uid, fds, seccomp_r, agent)
        else:
            self._workdir = tempfile.mkdtemp(prefix="daert-sandbox-")
            if uid is not None:
                os.chown(self._workdir, uid, uid)
            launch = drivers.process(self._settings, self.limits, uid, fds, self._workdir)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=launch.env,
                cwd=launch.cwd,
                pass_fds=passed,
                start_new_session=True,
            )
        finally:
            for fd in passed:
                os.close(fd)
        self._control_in = to_agent_w
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(from_agent_r, "rb", 0)
        )
        self._control_out = reader
        try:
            hello = await asyncio.wait_for(reader.readline(), START_TIMEOUT_S)
        except TimeoutError:
            hello = b""
        if not hello.startswith(b'{"ready"'):
            err = await self._process.stderr.read(4096) if self._process.stderr else b""
            await self.kill()
            raise RuntimeError(f"sandbox failed to start: {err.decode(errors='replace')}")
        return self

    async def execute(
        self,
        code: str,
        files: list[dict[str, Any]],
        output_paths: list[str],
        limits: Limits,
        hard_limits: Limits,
    ) -> Execution:
        """Run `code` under `limits`; `hard_limits` (never raised again by the code) are the
        call's own for a one-shot interpreter and the session's for a session."""
        assert self._process is not None and self._control_out is not None
        assert self._process.stdout is not None and self._process.stderr is not None
        assert self._control_in is not None
        control_in = self._control_in
        marker = f"\n--daert-end-{secrets.token_hex(16)}--\n".encode()
        request = {
            "code": code,
            "files": [
                {"path": f["path"], "content": base64.b64encode(f["content"]).decode(),
                 "mode": f.get("mode")}
                for f in files
            ],
            "output_paths": output_paths,
            "limits": limits.model_dump(),
            "hard_limits": hard_limits.model_dump(),
            "max_output_file_bytes": self._settings.max_returned_file_bytes,
            "max_rich_output_bytes": self._settings.max_rich_output_bytes,
            "marker": marker.decode(),
        }  # fmt: skip
        started = time.monotonic()
        out = _Capture(self._process.stdout, limits.max_output_bytes)
        err = _Capture(self._process.stderr, limits.max_output_bytes)
        stdout = asyncio.ensure_future(out.until(marker))
        stderr = asyncio.ensure_future(err.until(marker))
        answer = asyncio.ensure_future(self._control_out.readline())
        result = Execution()
        try:
            payload = json.dumps(request).encode() + b"\n"
            await asyncio.get_running_loop().run_in_executor(None, _write_all, control_in, payload)
            line = await asyncio.wait_for(asyncio.shield(answer), limits.timeout_ms / 1000)
        except TimeoutError:
            result.timed_out = True
            line = b""
        except (asyncio.CancelledError, BrokenPipeError):
            await self.kill()
            raise
        finally:
            if not answer.done():
                answer.cancel()

        if line:
            reply = json.loads(line)
            for key in ("exit_code", "error", "outputs", "files", "memory_exceeded",
                        "cpu_time_ms", "peak_memory_bytes"):  # fmt: skip
                setattr(result, key, reply[key])
            done, _ = await asyncio.wait({stdout, stderr}, timeout=MARKER_GRACE_S)
        else:
            # Timed out, or the interpreter died (signal, rlimit): keep the output written so
            # far. A dying interpreter gets a moment to exit by itself, so its own signal
            # (SIGSEGV, SIGXCPU) is what gets reported, not our SIGKILL.
            if not result.timed_out:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._process.wait(), 2.0)
            await self.kill()
            result.interpreter_lost = True
            assert self._process.returncode is not None
            result.signal = drivers.interpreter_exit_signal(
                self._settings.driver, self._process.returncode
            )
            if result.timed_out:
                result.signal = result.signal or signal.SIGKILL
            if result.signal == signal.SIGXCPU:
                result.timed_out = True
            result.exit_code = -1 if result.signal else self._process.returncode
            done, _ = await asyncio.wait({stdout, stderr}, timeout=MARKER_GRACE_S)
        for task in (stdout, stderr):
            if task not in done:
                task.cancel()
        result.stdout, result.stdout_truncated = out.output, out.truncated
        result.stderr, result.stderr_truncated = err.output, err.truncated
        result.duration_ms = int((time.monotonic() - started) * 1000)
        return result

    async def kill(self) -> None:
        """Kill the sandbox and everything in it (its pid namespace or process group)."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            await self._process.wait()
        if self._control_in is not None:
            with contextlib.suppress(OSError):
                os.close(self._control_in)
            self._control_in = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
