"""The sandbox service end to end: a real `daert serve sandbox` process running untrusted Python
in bubblewrap. Every attack asserts real containment (checked from the host where it can be:
/proc, the host's files, the service's own ports), sensible reporting in the ExecuteResponse,
and that the service is still SERVING and runs `print(1)` afterwards.

The tests assume what the service assumes here: Linux, bubblewrap installed, and the service
running as root, so that each sandbox runs as a uid of its own (200000 and up)."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import daert
import grpc
import pytest
from daert.clients import SandboxClient, field_violations
from daert.sandbox.config import DEFAULT_LIMITS, MAX_LIMITS
from daert.testing import ServerProcess
from daert.v1 import sandbox_pb2
from google.protobuf import duration_pb2

from tests.helpers import REPO

# A secret in the service's environment: it must never reach sandboxed code.
SECRET = "hunter2"
SECRET_ENV = "DAERT_SANDBOX_SECRET_PROBE"
# What a secret file on the host holds: it must never be readable from a sandbox.
HOST_SECRET = "daert-host-secret-7f3a9c"
UID_BASE = 200_000  # DAERT_SANDBOX_SANDBOX_UID_BASE's default
WORKSPACE_MB = 32
MIB = 1024 * 1024
SIGXCPU = int(signal.SIGXCPU)

# The environment sandboxed code may see (drivers.SANDBOX_ENV, plus PWD that bash-like
# launchers add); anything else came from the service.
ALLOWED_ENV = {
    "PATH",
    "HOME",
    "LANG",
    "MPLBACKEND",
    "MPLCONFIGDIR",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PWD",
}

# First lines of attack code: report the sandbox's uid (to look for its processes from the
# host afterwards) and name the process (and every child it forks) `tag`.
PROLOGUE = """\
import ctypes as _ctypes, os as _os
_ctypes.CDLL(None).prctl(15, {tag!r}, 0, 0, 0)
print(f"UID={{_os.getuid()}}", flush=True)
"""


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[ServerProcess]:
    if not os.environ.get("DAERT_SANDBOX_PACKAGES_DIR"):
        pytest.fail("DAERT_SANDBOX_PACKAGES_DIR is unset: run the suite with `make test`")
    env = {
        "DAERT_SANDBOX_POOL_SIZE": "2",
        "DAERT_SANDBOX_WORKSPACE_MB": str(WORKSPACE_MB),
        SECRET_ENV: SECRET,
    }
    with ServerProcess("sandbox", env) as server:
        server.wait_health("SERVING", timeout_s=60)
        yield server


@pytest.fixture(scope="module")
def limited_sandbox() -> Iterator[ServerProcess]:
    """A server that runs one execution at a time and keeps one session."""
    env = {
        "DAERT_SANDBOX_POOL_SIZE": "1",
        "DAERT_SANDBOX_MAX_CONCURRENT": "1",
        "DAERT_SANDBOX_MAX_SESSIONS": "1",
    }
    with ServerProcess("sandbox", env) as server:
        server.wait_health("SERVING", timeout_s=60)
        yield server


@pytest.fixture(scope="module")
def host_secret_file() -> Iterator[Path]:
    """A world-readable file on the host: only the sandbox's mount namespace keeps it away
    from the sandbox's uid."""
    folder = Path(tempfile.mkdtemp(prefix="daert-sandbox-host-"))
    folder.chmod(0o755)
    path = folder / "secret.txt"
    path.write_text(HOST_SECRET)
    path.chmod(0o644)
    yield path
    path.unlink()
    folder.rmdir()


@pytest.fixture
async def session(sandbox: ServerProcess) -> AsyncIterator[str]:
    async with SandboxClient(sandbox.target) as client:
        reply = await client.stub.CreateSession(sandbox_pb2.CreateSessionRequest())
    yield reply.session_id
    async with SandboxClient(sandbox.target) as client:
        await client.stub.CloseSession(sandbox_pb2.CloseSessionRequest(session_id=reply.session_id))


# --- helpers --------------------------------------------------------------------------------


def limits(**fields: int) -> sandbox_pb2.SandboxLimits:
    return sandbox_pb2.SandboxLimits(**fields)


async def execute(
    server: ServerProcess, code: str, *, deadline_s: float = 60.0, **fields: Any
) -> sandbox_pb2.ExecuteResponse:
    """Execute `code` (dedented); limits default to a 5 s wall clock to keep the suite fast."""
    fields.setdefault("limits", limits(timeout_ms=5000))
    async with SandboxClient(server.target, timeout_s=deadline_s) as client:
        return await client.stub.Execute(
            sandbox_pb2.ExecuteRequest(code=textwrap.dedent(code), **fields)
        )


async def timed_execute(
    server: ServerProcess, code: str, **fields: Any
) -> tuple[sandbox_pb2.ExecuteResponse, float]:
    started = time.monotonic()
    reply = await execute(server, code, **fields)
    return reply, time.monotonic() - started


async def attack(
    server: ServerProcess, tag: str, code: str, **fields: Any
) -> sandbox_pb2.ExecuteResponse:
    """Run attack code after the PROLOGUE (uid report, process name `tag`)."""
    return await execute(
        server, PROLOGUE.format(tag=tag.encode()) + textwrap.dedent(code), **fields
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def assert_still_serving(server: ServerProcess) -> None:
    """The service survived: health is SERVING and a fresh call works normally."""
    assert server.health() == "SERVING"
    reply = await execute(server, "print(1)")
    assert (reply.stdout, reply.exit_code, reply.signal, reply.timed_out) == ("1\n", 0, 0, False)
    assert not reply.HasField("error")


def sandbox_uid(reply: sandbox_pb2.ExecuteResponse) -> int:
    found = re.search(r"UID=(\d+)", reply.stdout)
    assert found, f"the code's first output line is lost: {reply.stdout[:200]!r}"
    uid = int(found.group(1))
    assert uid >= UID_BASE, f"sandboxed code runs as uid {uid}, not a sandbox uid of its own"
    return uid


def read_host_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def host_path_exists(path: str) -> bool:
    return os.path.lexists(path)


def host_processes() -> list[tuple[int, int, str]]:
    """(pid, real uid, name) of every process on the host, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        found.append((int(entry), int(fields["Uid"].split()[0]), fields["Name"].strip()))
    return found


async def assert_no_processes_left(
    *, uid: int | None = None, name: str | None = None, within_s: float = 10.0
) -> None:
    """Within `within_s` of the call's end, no host process runs as `uid` / is named `name`.
    It polls, so only a survivor waits that long: generous, for a busy machine's reaping."""

    def survivors() -> list[tuple[int, int, str]]:
        return [
            p
            for p in host_processes()
            if (uid is not None and p[1] == uid) or (name is not None and p[2] == name)
        ]

    for _ in range(int(within_s / 0.1)):
        if not survivors():
            break
        await asyncio.sleep(0.1)
    left = survivors()
    assert not left, f"processes outlived the call (pid, uid, name): {left}"


def assert_contained_kill(reply: sandbox_pb2.ExecuteResponse, sig: int) -> None:
    assert reply.signal == sig, (reply.signal, reply.stderr[-2000:])
    assert reply.exit_code == -1


# --- basic behaviour ------------------------------------------------------------------------


async def test_stdout_stderr_and_success(sandbox: ServerProcess) -> None:
    reply, elapsed = await timed_execute(
        sandbox,
        """
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        """,
    )
    assert reply.stdout == "to stdout\n"
    assert reply.stderr == "to stderr\n"
    assert (reply.exit_code, reply.signal, reply.timed_out, reply.memory_exceeded) == (
        0,
        0,
        False,
        False,
    )
    assert not reply.stdout_truncated and not reply.stderr_truncated
    assert not reply.HasField("error")
    assert reply.session_id == "" and not reply.session_reset
    assert list(reply.outputs) == [] and list(reply.files) == []
    # Measured by the service, so within the call as the client saw it (on any machine).
    assert 0 <= reply.duration_ms <= elapsed * 1000


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("import sys; sys.exit(3)", 3),
        ("import sys; sys.exit(0)", 0),
        ("import sys; sys.exit()", 0),
        ("raise SystemExit(7)", 7),
        ("import sys; sys.exit('bye')", 1),
    ],
)
async def test_sys_exit_sets_the_exit_code(
    sandbox: ServerProcess, code: str, exit_code: int
) -> None:
    reply = await execute(sandbox, "print('ran')\n" + code + "\nprint('not reached')")
    assert reply.exit_code == exit_code
    assert reply.stdout == "ran\n"
    assert reply.signal == 0 and not reply.timed_out
    assert not reply.HasField("error")  # exiting is not an exception


async def test_uncaught_exception_is_exit_code_1_with_the_error(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        def inner():
            raise ValueError("boom 42")
        print("before")
        inner()
        """,
    )
    assert reply.exit_code == 1
    assert reply.signal == 0 and not reply.timed_out
    assert reply.stdout == "before\n"
    assert reply.error.type_name == "ValueError"
    assert reply.error.message == "boom 42"
    assert reply.error.traceback.startswith("Traceback (most recent call last):")
    assert "in inner" in reply.error.traceback
    assert reply.error.traceback.rstrip().endswith("ValueError: boom 42")
    assert "agent.py" not in reply.error.traceback  # the sandbox's own frames are hidden
    assert "ValueError: boom 42" in reply.stderr


async def test_syntax_error_is_reported(sandbox: ServerProcess) -> None:
    reply = await execute(sandbox, "def broken(:\n    pass")
    assert reply.exit_code == 1
    assert reply.error.type_name == "SyntaxError"
    await assert_still_serving(sandbox)


async def test_last_expression_is_a_text_plain_output(sandbox: ServerProcess) -> None:
    reply = await execute(sandbox, "x = 6\nprint('printed')\nx * 7")
    assert reply.stdout == "printed\n"
    assert [(o.mime_type, o.data) for o in reply.outputs] == [("text/plain", b"42")]

    reply = await execute(sandbox, "{'a': [1, 2]}")
    assert [(o.mime_type, o.data) for o in reply.outputs] == [("text/plain", b"{'a': [1, 2]}")]

    for no_value in ("x = 1", "print('p')", "None", "6 * 7\nx = 1"):
        reply = await execute(sandbox, no_value)
        assert list(reply.outputs) == [], no_value


async def test_dataframe_comes_back_as_text_and_html(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [1, 2]})",
        limits=limits(timeout_ms=30000),
    )
    assert reply.exit_code == 0, reply.stderr
    kinds = {o.mime_type: o.data.decode() for o in reply.outputs}
    assert "Oslo" in kinds["text/plain"] and "Lima" in kinds["text/plain"]
    assert "<table" in kinds["text/html"] and "Oslo" in kinds["text/html"]


async def test_matplotlib_figure_comes_back_as_png(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(4, 3), dpi=50)
        ax.plot([1, 2, 3], [4, 1, 9])
        print("plotted")
        """,
        limits=limits(timeout_ms=60000),
    )
    assert reply.exit_code == 0, reply.stderr
    pngs = [o.data for o in reply.outputs if o.mime_type == "image/png"]
    assert len(pngs) == 1, [o.mime_type for o in reply.outputs]
    png = pngs[0]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (200, 150)
    assert png.endswith(b"IEND\xaeB`\x82")


async def test_input_files_are_readable_and_not_returned_unchanged(
    sandbox: ServerProcess,
) -> None:
    reply = await execute(
        sandbox,
        """
        import os, subprocess
        print(open("data/in.txt").read())
        print(oct(os.stat("run.sh").st_mode & 0o777), oct(os.stat("data/in.txt").st_mode & 0o777))
        print(subprocess.run(["./run.sh"], capture_output=True, text=True).stdout.strip())
        """,
        files=[
            sandbox_pb2.SandboxFile(path="data/in.txt", content=b"hello from the caller"),
            sandbox_pb2.SandboxFile(path="run.sh", content=b"#!/bin/sh\necho hi\n", mode=0o755),
        ],
    )
    assert reply.exit_code == 0, reply.stderr
    assert reply.stdout.splitlines() == ["hello from the caller", "0o755 0o644", "hi"]
    assert list(reply.files) == []  # unmodified inputs are never returned


async def test_written_files_come_back(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        import os
        with open("out.csv", "w") as f:
            f.write("a,b\\n1,2\\n")
        os.makedirs("sub", exist_ok=True)
        with open("sub/notes.txt", "wb") as f:
            f.write(b"\\x00\\x01binary")
        with open("in.txt", "a") as f:
            f.write(" + appended")
        """,
        files=[sandbox_pb2.SandboxFile(path="in.txt", content=b"original")],
    )
    assert reply.exit_code == 0, reply.stderr
    got = {f.path: f for f in reply.files}
    assert [f.path for f in reply.files] == ["in.txt", "out.csv", "sub/notes.txt"]  # sorted
    assert got["out.csv"].content == b"a,b\n1,2\n" and got["out.csv"].size == 8
    assert got["sub/notes.txt"].content == b"\x00\x01binary"
    assert got["in.txt"].content == b"original + appended"  # a modified input comes back
    for f in reply.files:
        assert not f.truncated and not f.omitted and f.size == len(f.content)


async def test_written_files_carry_a_guessed_media_type(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        "open('out.csv', 'w').write('a\\n1\\n'); open('page.html', 'w').write('<p>')\n"
        "open('blob.unknownext', 'w').write('?')",
    )
    types = {f.path: f.mime_type for f in reply.files}
    assert types == {"blob.unknownext": "", "out.csv": "text/csv", "page.html": "text/html"}


async def test_output_paths_select_the_returned_files(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        import os
        os.makedirs("plots", exist_ok=True)
        for name in ("a.csv", "b.txt", "plots/p.png", "plots/q.txt"):
            open(name, "w").write(name)
        """,
        output_paths=["*.csv", "plots/*.png"],
    )
    assert reply.exit_code == 0, reply.stderr
    assert {f.path: f.content for f in reply.files} == {
        "a.csv": b"a.csv",
        "plots/p.png": b"plots/p.png",
    }


# --- sessions -------------------------------------------------------------------------------


async def test_session_keeps_variables_and_files(sandbox: ServerProcess, session: str) -> None:
    first = await execute(sandbox, "x = 41\nopen('kept.txt', 'w').write('still here')",
                          session_id=session)  # fmt: skip
    assert first.exit_code == 0, first.stderr
    assert first.session_id == session and not first.session_reset
    second = await execute(sandbox, "print(open('kept.txt').read())\nx + 1", session_id=session)
    assert second.exit_code == 0, second.stderr
    assert second.stdout == "still here\n"
    assert [(o.mime_type, o.data) for o in second.outputs] == [("text/plain", b"42")]
    assert second.session_id == session and not second.session_reset

    async with SandboxClient(sandbox.target) as client:
        listed = await client.stub.ListSessions(sandbox_pb2.ListSessionsRequest())
    mine = [s for s in listed.sessions if s.session_id == session]
    assert len(mine) == 1
    assert mine[0].execution_count == 2 and not mine[0].busy
    assert mine[0].limits.memory_mb == DEFAULT_LIMITS.memory_mb  # defaults resolved
    assert mine[0].expires_at.ToNanoseconds() > mine[0].last_used_at.ToNanoseconds()


async def test_closed_session_is_not_found(sandbox: ServerProcess) -> None:
    async with SandboxClient(sandbox.target) as client:
        created = await client.stub.CreateSession(
            sandbox_pb2.CreateSessionRequest(session_id="closing-test")
        )
        assert created.session_id == "closing-test"
        duplicate = await rpc_error(
            client.stub.CreateSession(sandbox_pb2.CreateSessionRequest(session_id="closing-test"))
        )
        assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
        closed = await client.stub.CloseSession(
            sandbox_pb2.CloseSessionRequest(session_id="closing-test")
        )
        assert closed.closed
        again = await client.stub.CloseSession(
            sandbox_pb2.CloseSessionRequest(session_id="closing-test")
        )
        assert not again.closed  # idempotent
        listed = await client.stub.ListSessions(sandbox_pb2.ListSessionsRequest())
        assert "closing-test" not in [s.session_id for s in listed.sessions]
    error = await rpc_error(execute(sandbox, "print(1)", session_id="closing-test"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_session_is_not_found(sandbox: ServerProcess) -> None:
    error = await rpc_error(execute(sandbox, "print(1)", session_id="no-such-session"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-session" in (error.details() or "")


async def test_idle_session_expires(sandbox: ServerProcess) -> None:
    async with SandboxClient(sandbox.target) as client:
        created = await client.stub.CreateSession(
            sandbox_pb2.CreateSessionRequest(idle_ttl=duration_pb2.Duration(seconds=1))
        )
    assert created.idle_ttl.ToNanoseconds() == 1_000_000_000
    used = await execute(sandbox, "y = 1", session_id=created.session_id)
    assert used.exit_code == 0
    # The reaper sweeps every second: wait for it (listing does not touch the session), up
    # to 30 TTLs, so a busy machine cannot fail this; a session that never expires does.
    for _ in range(300):
        await asyncio.sleep(0.1)
        async with SandboxClient(sandbox.target) as client:
            listed = await client.stub.ListSessions(sandbox_pb2.ListSessionsRequest())
        if created.session_id not in [s.session_id for s in listed.sessions]:
            break
    assert created.session_id not in [s.session_id for s in listed.sessions]
    error = await rpc_error(execute(sandbox, "print(y)", session_id=created.session_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("seconds", [-1, 0, 10**6])
async def test_bad_idle_ttl_is_invalid_argument(sandbox: ServerProcess, seconds: int) -> None:
    async with SandboxClient(sandbox.target) as client:
        error = await rpc_error(
            client.stub.CreateSession(
                sandbox_pb2.CreateSessionRequest(idle_ttl=duration_pb2.Duration(seconds=seconds))
            )
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("idle_ttl:")
    assert "idle_ttl" in field_violations(error)


async def test_session_reports_reset_when_its_interpreter_is_killed(
    sandbox: ServerProcess, session: str
) -> None:
    """The call whose interpreter was killed reports session_reset (with timed_out), once:
    the next call runs in a fresh interpreter without the old variables and reports
    nothing more."""
    assert (await execute(sandbox, "x = 1", session_id=session)).exit_code == 0
    killed = await execute(
        sandbox, "while True: pass", session_id=session, limits=limits(timeout_ms=1500)
    )
    assert killed.timed_out and killed.session_reset
    assert_contained_kill(killed, signal.SIGKILL)
    assert killed.session_id == session

    after = await execute(sandbox, "print('x' in globals())", session_id=session)
    assert after.exit_code == 0, after.stderr
    assert after.stdout == "False\n"  # variables are lost
    assert not after.session_reset and not after.timed_out
    await assert_still_serving(sandbox)


async def test_session_reset_starts_from_an_empty_workspace(
    sandbox: ServerProcess, session: str
) -> None:
    """sandbox.proto, session_reset: "its variables and workspace files are lost" (the
    workspace is a tmpfs inside the interpreter's sandbox, gone with it)."""
    wrote = await execute(sandbox, "open('notes.txt', 'w').write('survives')", session_id=session)
    assert wrote.exit_code == 0
    killed = await execute(
        sandbox, "while True: pass", session_id=session, limits=limits(timeout_ms=1500)
    )
    assert killed.timed_out and killed.session_reset
    after = await execute(sandbox, "import os\nprint(sorted(os.listdir('.')))", session_id=session)
    assert after.exit_code == 0, after.stderr
    assert after.stdout == "[]\n"


# --- request validation ---------------------------------------------------------------------

LIMIT_FIELDS = list(MAX_LIMITS.model_dump())


@pytest.mark.parametrize("field", LIMIT_FIELDS)
@pytest.mark.parametrize("kind", ["negative", "above-max"])
async def test_bad_limits_are_invalid_argument_naming_the_field(
    sandbox: ServerProcess, field: str, kind: str
) -> None:
    value = -1 if kind == "negative" else getattr(MAX_LIMITS, field) + 1
    error = await rpc_error(execute(sandbox, "print(1)", limits=limits(**{field: value})))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"limits.{field}:"), error.details()
    assert f"limits.{field}" in field_violations(error)

    async with SandboxClient(sandbox.target) as client:
        error = await rpc_error(
            client.stub.CreateSession(
                sandbox_pb2.CreateSessionRequest(limits=limits(**{field: value}))
            )
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"limits.{field}:"), error.details()


async def test_limits_at_the_maximum_are_accepted(sandbox: ServerProcess) -> None:
    reply = await execute(sandbox, "print('ok')", limits=limits(**MAX_LIMITS.model_dump()))
    assert reply.stdout == "ok\n" and reply.exit_code == 0


@pytest.mark.parametrize("code", ["", "   \n\t  "])
async def test_empty_code_is_invalid_argument(sandbox: ServerProcess, code: str) -> None:
    error = await rpc_error(execute(sandbox, code))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("code:")
    assert "code" in field_violations(error)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "..", "", "a\x00b", "./../x"])
async def test_input_paths_escaping_the_workspace_are_rejected(
    sandbox: ServerProcess, path: str
) -> None:
    good = sandbox_pb2.SandboxFile(path="fine.txt", content=b"ok")
    bad = sandbox_pb2.SandboxFile(path=path, content=b"pwned")
    error = await rpc_error(execute(sandbox, "print(1)", files=[bad]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("files[0].path:"), error.details()
    assert "files[0].path" in field_violations(error)
    error = await rpc_error(execute(sandbox, "print(1)", files=[good, bad]))
    assert (error.details() or "").startswith("files[1].path:"), error.details()


@pytest.mark.parametrize("path", [".", "a/..", "./"])
async def test_input_path_naming_the_workspace_itself_is_rejected(
    sandbox: ServerProcess, path: str
) -> None:
    """A file cannot be written over the workspace directory: reject it up front instead of
    failing inside the sandbox."""
    error = await rpc_error(
        execute(sandbox, "print(1)", files=[sandbox_pb2.SandboxFile(path=path, content=b"x")])
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("files[0].path:"), error.details()
    await assert_still_serving(sandbox)


@pytest.mark.parametrize("pattern", ["../*", "/etc/*"])
async def test_output_paths_escaping_the_workspace_are_rejected(
    sandbox: ServerProcess, pattern: str
) -> None:
    error = await rpc_error(execute(sandbox, "print(1)", output_paths=["*.csv", pattern]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("output_paths[1]:"), error.details()


# --- concurrency ----------------------------------------------------------------------------


async def test_too_many_concurrent_executions_is_resource_exhausted(
    limited_sandbox: ServerProcess,
) -> None:
    slow = "import time; time.sleep(1.5); print('slept')"
    results = await asyncio.gather(
        execute(limited_sandbox, slow), execute(limited_sandbox, slow), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    replies = [r for r in results if isinstance(r, sandbox_pb2.ExecuteResponse)]
    assert [e.code() for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED], results
    assert [r.stdout for r in replies] == ["slept\n"]
    await assert_still_serving(limited_sandbox)  # the slot is free again


async def test_too_many_sessions_is_resource_exhausted(limited_sandbox: ServerProcess) -> None:
    async with SandboxClient(limited_sandbox.target) as client:
        first = await client.stub.CreateSession(sandbox_pb2.CreateSessionRequest())
        try:
            error = await rpc_error(client.stub.CreateSession(sandbox_pb2.CreateSessionRequest()))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await client.stub.CloseSession(
                sandbox_pb2.CloseSessionRequest(session_id=first.session_id)
            )
        second = await client.stub.CreateSession(sandbox_pb2.CreateSessionRequest())
        await client.stub.CloseSession(
            sandbox_pb2.CloseSessionRequest(session_id=second.session_id)
        )


# --- attacks: time ----------------------------------------------------------------------------


async def test_infinite_loop_is_killed_at_the_wall_clock_limit(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox, "dx-loop", "print('started', flush=True)\nwhile True:\n    pass",
        limits=limits(timeout_ms=2000),
    )  # fmt: skip
    assert reply.timed_out
    assert_contained_kill(reply, signal.SIGKILL)
    assert "started" in reply.stdout  # output before the kill is kept
    # The loop never ends by itself: the reply is the kill. A lower bound only: a busy
    # machine may take any time to answer.
    assert reply.duration_ms >= 2000
    assert not reply.memory_exceeded
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-loop")
    await assert_still_serving(sandbox)


async def test_sleeping_past_the_wall_clock_is_killed(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox, "dx-sleep", "import time\ntime.sleep(60)", limits=limits(timeout_ms=1500)
    )
    assert reply.timed_out
    assert_contained_kill(reply, signal.SIGKILL)
    # Killed at the limit, long before the sleep ends (no tighter: a busy machine is slow).
    assert 1500 <= reply.duration_ms < 60_000
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-sleep")
    await assert_still_serving(sandbox)


async def test_cpu_time_limit_kills_a_busy_loop(sandbox: ServerProcess) -> None:
    # A wall clock 30 times the CPU limit: even a busy machine gives the loop 1 s of CPU
    # first. SIGXCPU says the CPU limit fired; the wall clock's kill is SIGKILL.
    reply = await attack(
        sandbox,
        "dx-cpu",
        "while True:\n    pass",
        limits=limits(timeout_ms=30000, cpu_time_ms=1000),
    )
    assert reply.timed_out  # "the wall-clock or CPU-time limit was hit"
    assert_contained_kill(reply, SIGXCPU)
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-cpu")
    await assert_still_serving(sandbox)


# --- attacks: processes ---------------------------------------------------------------------


async def test_fork_bomb_is_contained(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-forkbomb",
        """
        while True:
            try:
                _os.fork()
            except OSError:
                pass
        """,
        limits=limits(timeout_ms=2000, max_processes=16),
    )
    # The bomb never ends by itself: a reply at all is the kill (the host checks follow).
    assert reply.timed_out or reply.signal or reply.HasField("error")
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-forkbomb")
    await assert_still_serving(sandbox)


async def test_process_count_is_bounded_by_max_processes(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-forkcount",
        """
        import time
        children = 0
        while children < 1000:
            try:
                pid = _os.fork()
            except OSError as exc:
                print("fork failed:", type(exc).__name__)
                break
            if pid == 0:
                time.sleep(60)
                _os._exit(0)
            children += 1
        print("children", children)
        """,
        limits=limits(timeout_ms=10000, max_processes=16),
    )
    assert reply.exit_code == 0 and not reply.timed_out, reply.stderr
    assert "fork failed: BlockingIOError" in reply.stdout
    children = int(re.search(r"children (\d+)", reply.stdout).group(1))  # type: ignore[union-attr]
    assert 0 < children < 16
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-forkcount")
    await assert_still_serving(sandbox)


async def test_thread_bomb_is_bounded(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-threads",
        """
        import threading, time
        started = 0
        while started < 5000:
            try:
                threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            except RuntimeError as exc:
                print("refused:", exc)
                break
            started += 1
        print("threads", started)
        """,
        limits=limits(timeout_ms=10000, max_processes=16),
    )
    assert reply.exit_code == 0 and not reply.timed_out, reply.stderr
    assert "refused: can't start new thread" in reply.stdout
    started = int(re.search(r"threads (\d+)", reply.stdout).group(1))  # type: ignore[union-attr]
    assert 0 < started < 16
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-threads")
    await assert_still_serving(sandbox)


DAEMON = """
import time
if _os.fork() == 0:
    _os.setsid()
    if _os.fork() == 0:
        _ctypes.CDLL(None).prctl(15, b"dx-daemon", 0, 0, 0)
        time.sleep(30)
        _os._exit(0)
    _os._exit(0)
_os.wait()
time.sleep(0.3)
names = []
for pid in [p for p in _os.listdir("/proc") if p.isdigit()]:
    try:
        names.append(open(f"/proc/{pid}/comm").read().strip())
    except OSError:
        pass
print("daemon launched" if "dx-daemon" in names else f"no daemon running: {names}")
"""


async def test_double_forked_daemon_does_not_outlive_a_call(sandbox: ServerProcess) -> None:
    reply = await attack(sandbox, "dx-daemonize", DAEMON)
    assert reply.exit_code == 0 and "daemon launched" in reply.stdout, reply.stderr
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-daemon")
    await assert_still_serving(sandbox)


async def test_double_forked_daemon_does_not_outlive_a_session_call(
    sandbox: ServerProcess, session: str
) -> None:
    """In a session the interpreter stays, so the agent itself must reap the daemon."""
    reply = await attack(sandbox, "dx-daemonize", DAEMON + "kept = 1\n", session_id=session)
    assert reply.exit_code == 0 and "daemon launched" in reply.stdout, reply.stderr
    await assert_no_processes_left(name="dx-daemon")
    after = await execute(sandbox, "kept + 1", session_id=session)
    assert [o.data for o in after.outputs] == [b"2"] and not after.session_reset
    await assert_still_serving(sandbox)


async def test_killing_the_parent_does_not_hurt_the_service(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox, "dx-killppid", "_os.kill(_os.getppid(), 9)\nimport time\ntime.sleep(0.5)"
    )
    assert not reply.timed_out  # reported when it died, not at the wall clock
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-killppid")
    await assert_still_serving(sandbox)


async def test_killing_its_own_process_group_is_reported_as_sigkill(
    sandbox: ServerProcess,
) -> None:
    reply = await attack(sandbox, "dx-killpg", "_os.kill(0, 9)")
    assert not reply.timed_out  # reported when it died, not at the wall clock
    assert_contained_kill(reply, signal.SIGKILL)
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-killpg")
    await assert_still_serving(sandbox)


# --- attacks: memory and crashes --------------------------------------------------------------


async def test_10gb_allocation_is_memory_exceeded(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox, "dx-10gb", "block = bytearray(10 * 1024**3)\nprint('allocated')",
        limits=limits(memory_mb=256),
    )  # fmt: skip
    assert reply.memory_exceeded
    assert "allocated" not in reply.stdout
    assert not reply.timed_out
    assert reply.error.type_name == "MemoryError" or reply.signal, reply
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-10gb")
    await assert_still_serving(sandbox)


async def test_large_numpy_allocation_is_memory_exceeded(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-numpy",
        "import numpy as np\nprint('imported', flush=True)\n"
        "a = np.ones((50_000, 50_000))\nprint('allocated', a.nbytes)",
        limits=limits(memory_mb=512, timeout_ms=20000),
    )
    assert "imported" in reply.stdout, reply.stderr  # numpy itself loads within the limit
    assert reply.memory_exceeded
    assert "allocated" not in reply.stdout
    assert not reply.timed_out
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-numpy")
    await assert_still_serving(sandbox)


async def test_growing_memory_stops_at_the_limit(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-grow",
        """
        chunks = []
        while len(chunks) < 1000:
            chunks.append(bytearray(8 * 1024 * 1024))
            chunks[-1][::4096] = b"x" * len(chunks[-1][::4096])
        print("grew to", len(chunks) * 8, "MiB")
        """,
        limits=limits(memory_mb=256, timeout_ms=10000),
    )
    assert reply.memory_exceeded and not reply.timed_out
    assert "grew to" not in reply.stdout
    assert reply.peak_memory_bytes <= 256 * MIB
    await assert_still_serving(sandbox)


async def test_deep_recursion_is_a_recursion_error(sandbox: ServerProcess) -> None:
    reply = await execute(sandbox, "def f(n):\n    return f(n + 1)\nf(0)")
    assert reply.exit_code == 1 and reply.signal == 0
    assert reply.error.type_name == "RecursionError"
    await assert_still_serving(sandbox)


async def test_unbounded_recursion_crash_is_reported(sandbox: ServerProcess) -> None:
    # 10**6 frames and their traceback cost seconds of CPU (7 to 11 here): the limits are
    # the maxima, so that the crash or the error is what ends it, on any machine.
    reply = await attack(
        sandbox,
        "dx-recurse",
        "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)",
        limits=limits(timeout_ms=MAX_LIMITS.timeout_ms, cpu_time_ms=MAX_LIMITS.cpu_time_ms),
        deadline_s=MAX_LIMITS.timeout_ms / 1000 + 30,
    )
    assert not reply.timed_out, reply
    if reply.signal:
        assert_contained_kill(reply, signal.SIGSEGV)
    else:
        assert reply.exit_code == 1
        assert reply.error.type_name in ("RecursionError", "MemoryError")
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-recurse")
    await assert_still_serving(sandbox)


async def test_segfault_is_reported_as_sigsegv(sandbox: ServerProcess) -> None:
    reply = await attack(sandbox, "dx-segv", "print('before', flush=True)\n_ctypes.string_at(0)")
    assert_contained_kill(reply, signal.SIGSEGV)
    assert not reply.timed_out and not reply.memory_exceeded
    assert "before" in reply.stdout
    await assert_no_processes_left(uid=sandbox_uid(reply), name="dx-segv")
    await assert_still_serving(sandbox)


# --- attacks: output --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_a_gigabyte_of_output_is_truncated(sandbox: ServerProcess, stream: str) -> None:
    cap = 64 * 1024
    reply = await execute(
        sandbox,
        f"""
        import sys
        chunk = b"x" * (1 << 20)
        written = 0
        for _ in range(1024):
            written += sys.{stream}.buffer.write(chunk)
        print("done", written, file=sys.{"stderr" if stream == "stdout" else "stdout"})
        """,
        limits=limits(timeout_ms=60000, max_output_bytes=cap),
        deadline_s=90,  # past the wall clock: the service reports, the client does not give up
    )
    assert reply.exit_code == 0 and not reply.timed_out, reply
    flooded = getattr(reply, stream)
    assert getattr(reply, f"{stream}_truncated")
    assert 0 < len(flooded.encode()) <= cap
    assert set(flooded) == {"x"}
    other = "stderr" if stream == "stdout" else "stdout"
    assert getattr(reply, other) == f"done {1 << 30}\n" and not getattr(reply, f"{other}_truncated")
    await assert_still_serving(sandbox)


async def test_invalid_utf8_without_newline_is_replaced(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        "import sys\nsys.stdout.buffer.write(b'\\xff\\xfeabc')\n"
        "sys.stderr.buffer.write(b'err\\xc3')",
    )
    assert reply.exit_code == 0
    assert reply.stdout == "\ufffd\ufffdabc"
    assert reply.stderr == "err\ufffd"
    await assert_still_serving(sandbox)


async def test_closing_stdout_does_not_hang_the_call(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox, "import os, sys\nprint('bye', flush=True)\nos.close(1)\nos.close(2)\n6 * 7"
    )
    # Answered (the value came back) within its wall clock; a hang fails the RPC deadline.
    assert not reply.timed_out and [o.data for o in reply.outputs] == [b"42"]
    assert reply.stdout == "bye\n"
    await assert_still_serving(sandbox)


# --- attacks: files ---------------------------------------------------------------------------


async def test_filling_the_workspace_is_reported_not_hung(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        with open("fill.bin", "wb") as f:
            while True:
                f.write(b"\\0" * (1 << 20))
        """,
        limits=limits(timeout_ms=20000, max_file_bytes=4 * WORKSPACE_MB * MIB),
        output_paths=["nothing-returned"],
    )
    assert not reply.timed_out
    assert reply.exit_code == 1
    assert reply.error.type_name == "OSError"
    assert "No space left on device" in reply.error.message
    await assert_still_serving(sandbox)


@pytest.mark.parametrize("folder", ["/workspace/fill", "/tmp/fill", "/fill"])
async def test_filling_any_writable_filesystem_is_bounded(
    sandbox: ServerProcess, folder: str
) -> None:
    """Many files, each under max_file_bytes: the folder's filesystem must run out well
    before 4 x DAERT_SANDBOX_WORKSPACE_MB (the loop stops there, to spare the host)."""
    cap_mb = 4 * WORKSPACE_MB
    reply = await execute(
        sandbox,
        f"FOLDER, CAP_MB = {folder!r}, {cap_mb}\n"
        + textwrap.dedent(
            """
            import os
            written = 0
            try:
                os.makedirs(FOLDER, exist_ok=True)
                while written < CAP_MB:
                    with open(f"{FOLDER}/{written}.bin", "wb") as f:
                        f.write(b"\\0" * (1 << 20))
                    written += 1
                print("WROTE", written, "MiB: not stopped")
            except OSError as exc:
                print("STOPPED after", written, "MiB:", type(exc).__name__, exc)
            """
        ),
        limits=limits(timeout_ms=20000),
        output_paths=["nothing-returned"],
    )
    assert reply.exit_code == 0, reply.stderr
    assert "STOPPED after" in reply.stdout, reply.stdout
    assert not reply.timed_out
    await assert_still_serving(sandbox)


async def test_writing_past_max_file_bytes_fails(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        with open("big.bin", "wb") as f:
            for _ in range(64):
                f.write(b"\\0" * (256 * 1024))
        """,
        limits=limits(max_file_bytes=MIB),
    )
    assert not reply.timed_out
    assert reply.exit_code == 1 and reply.signal == 0
    assert reply.error.type_name == "OSError"
    assert "File too large" in reply.error.message
    big = [f for f in reply.files if f.path == "big.bin"]
    assert big and big[0].size <= MIB and len(big[0].content) <= MIB
    await assert_still_serving(sandbox)


async def test_written_files_beyond_the_return_budget_still_get_a_response(
    sandbox: ServerProcess,
) -> None:
    """Three 3 MiB files: more than the 4 MiB returned-bytes budget. The call must still
    answer, with the rest truncated or omitted but every path and size reported."""
    reply = await execute(
        sandbox,
        """
        for name in ("a.bin", "b.bin", "c.bin"):
            with open(name, "wb") as f:
                f.write(b"z" * (3 * 1024 * 1024))
        """,
        limits=limits(timeout_ms=20000, max_file_bytes=3 * MIB),
    )
    assert reply.exit_code == 0, reply.stderr
    assert [(f.path, f.size) for f in reply.files] == [
        ("a.bin", 3 * MIB),
        ("b.bin", 3 * MIB),
        ("c.bin", 3 * MIB),
    ]
    assert sum(len(f.content) for f in reply.files) <= 4 * MIB
    assert any(f.truncated or f.omitted for f in reply.files)


async def test_exhausting_file_descriptors_is_reported(sandbox: ServerProcess) -> None:
    reply = await attack(
        sandbox,
        "dx-fds",
        """
        handles = []
        while len(handles) < 100_000:
            handles.append(open("/dev/null"))
        """,
    )
    assert not reply.timed_out
    assert reply.exit_code == 1 and reply.signal == 0, reply
    assert reply.error.type_name == "OSError"
    assert "Too many open files" in reply.error.message
    await assert_still_serving(sandbox)


async def test_symlinks_in_the_workspace_are_never_followed(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        import os
        os.symlink("/etc/passwd", "passwd")
        os.symlink("/opt/daert/agent.py", "agent")
        os.symlink("/proc/self/environ", "environ")
        open("real.txt", "w").write("real")
        """,
    )
    assert reply.exit_code == 0, reply.stderr
    got = {f.path: f for f in reply.files}
    assert got["real.txt"].content == b"real"
    for link in ("passwd", "agent", "environ"):
        if link in got:  # reported, but never read through
            assert got[link].content == b"" and got[link].omitted, got[link]
    passwd = read_host_file("/etc/passwd")[:20]
    assert all(passwd not in f.content for f in reply.files)


async def test_writing_outside_the_workspace_fails(sandbox: ServerProcess) -> None:
    packages = os.environ.get("DAERT_SANDBOX_PACKAGES_DIR", "")
    reply = await execute(
        sandbox,
        """
        import os
        targets = ["/usr/dx-probe", "/usr/lib/dx-probe", "/etc/dx-probe", "/dx-probe",
                   "/opt/daert/dx-probe", "/opt/daert/agent.py",
                   "/opt/daert/packages/dx-probe.py", "/opt/daert/packages/numpy/__init__.py",
                   "/proc/sys/kernel/hostname", "/root/dx-probe"]
        for path in targets:
            try:
                with open(path, "a") as f:
                    f.write("pwned")
                print(path, "WRITTEN")
            except OSError as exc:
                print(path, "DENIED", type(exc).__name__)
        for path in ["/usr/dx-dir", "/etc/dx-dir", "/opt/dx-dir"]:
            try:
                os.mkdir(path)
                print(path, "WRITTEN")
            except OSError as exc:
                print(path, "DENIED", type(exc).__name__)
        """,
    )
    assert reply.exit_code == 0, reply.stderr
    lines = reply.stdout.splitlines()
    assert len(lines) == 13, lines
    assert all(" DENIED " in line for line in lines), [x for x in lines if "WRITTEN" in x]
    for host_path in ("/usr/dx-probe", "/etc/dx-probe", f"{packages}/dx-probe.py"):
        assert not host_path_exists(host_path), host_path
    if packages:
        assert b"pwned" not in read_host_file(f"{packages}/numpy/__init__.py")
    assert b"pwned" not in read_host_file(str(REPO / "services/daert/sandbox/agent.py"))
    await assert_still_serving(sandbox)


async def test_state_does_not_pass_to_the_next_one_shot_call(sandbox: ServerProcess) -> None:
    first = await execute(
        sandbox,
        """
        import os
        open("/workspace/secret.txt", "w").write("left behind")
        open("/tmp/x", "w").write("left behind")
        LEFT_BEHIND = "global"
        os.environ["LEFT_BEHIND"] = "env"
        """,
    )
    assert first.exit_code == 0, first.stderr
    for _ in range(3):  # whichever warm interpreter comes next
        nxt = await execute(
            sandbox,
            """
            import os
            print(os.path.exists("/workspace/secret.txt"), os.path.exists("/tmp/x"),
                  "LEFT_BEHIND" in globals(), "LEFT_BEHIND" in os.environ, os.listdir("."))
            """,
        )
        assert nxt.stdout == "False False False False []\n", nxt.stdout


# --- attacks: isolation -----------------------------------------------------------------------


async def test_no_network_egress(sandbox: ServerProcess) -> None:
    abstract_name = f"\0daert-sandbox-probe-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(abstract_name)
    listener.listen(1)
    try:
        reply = await execute(
            sandbox,
            f"GRPC_PORT = {sandbox.grpc_port}\nMETRICS_PORT = {sandbox.metrics_port}\n"
            f"ABSTRACT = {abstract_name!r}\n"
            + textwrap.dedent(
                """
                import socket
                def tcp(host, port, family=socket.AF_INET):
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.settimeout(2)
                    s.connect((host, port))
                def udp():
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.sendto(b"\\0" * 12, ("8.8.8.8", 53))
                def unix():
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(2)
                    s.connect(ABSTRACT)
                probes = {
                    "tcp-1.1.1.1": lambda: tcp("1.1.1.1", 80),
                    "tcp-metadata": lambda: tcp("169.254.169.254", 80),
                    "udp-8.8.8.8": udp,
                    "dns": lambda: socket.getaddrinfo("example.com", 80),
                    "tcp6": lambda: tcp("2606:4700:4700::1111", 80, socket.AF_INET6),
                    "grpc-port": lambda: tcp("127.0.0.1", GRPC_PORT),
                    "metrics-port": lambda: tcp("127.0.0.1", METRICS_PORT),
                    "abstract-unix": unix,
                }
                for name, probe in probes.items():
                    try:
                        probe()
                        print(name, "CONNECTED")
                    except BaseException as exc:
                        print(name, "BLOCKED", type(exc).__name__, exc)
                devices = [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]]
                print("devices", sorted(devices))
                """
            ),
            limits=limits(timeout_ms=20000),
        )
        listener.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing reached the host's abstract socket
    finally:
        listener.close()
    assert reply.exit_code == 0, reply.stderr
    assert "CONNECTED" not in reply.stdout, reply.stdout
    blocked = [line.split()[0] for line in reply.stdout.splitlines() if " BLOCKED " in line]
    assert blocked == [
        "tcp-1.1.1.1",
        "tcp-metadata",
        "udp-8.8.8.8",
        "dns",
        "tcp6",
        "grpc-port",
        "metrics-port",
        "abstract-unix",
    ], reply.stdout
    assert "devices ['lo']" in reply.stdout  # no interface but loopback
    await assert_still_serving(sandbox)


async def test_host_files_are_not_readable(sandbox: ServerProcess, host_secret_file: Path) -> None:
    shadow_line = read_host_file("/etc/shadow").decode().splitlines()[0]
    denied = [
        "/etc/shadow",
        "/etc/passwd",
        "/root/.ssh",
        "/root/.ssh/id_rsa",
        "/root",
        str(host_secret_file),
        str(REPO / "pyproject.toml"),
        str(sandbox.log_path),
    ]
    targets = [*denied, "/proc/1/environ", "/proc/1/root/etc/shadow"]
    reply = await execute(
        sandbox,
        f"TARGETS = {targets!r}\n"
        + textwrap.dedent(
            """
            import os
            for path in TARGETS:
                try:
                    if os.path.isdir(path):
                        print(path, "LISTED", os.listdir(path))
                    else:
                        print(path, "READ", open(path, "rb").read(4096))
                except OSError as exc:
                    print(path, "DENIED", type(exc).__name__)
            """
        ),
    )
    assert reply.exit_code == 0, reply.stderr
    output = reply.stdout + reply.stderr
    assert HOST_SECRET not in output
    assert shadow_line not in output and "root:x:0:0" not in output
    assert SECRET not in output
    lines = dict(line.split(" ", 1) for line in reply.stdout.splitlines())
    assert set(lines) == set(targets), reply.stdout
    for path in denied:
        assert lines[path].startswith("DENIED"), (path, lines[path])
    await assert_still_serving(sandbox)


def real_paths(*paths: str) -> set[str]:
    """Each path with symlinks resolved (as mountinfo shows it) and as given, absolute."""
    return {os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths}


def packages_dir() -> str:
    """DAERT_SANDBOX_PACKAGES_DIR with symlinks resolved, as mountinfo shows it."""
    return os.path.realpath(os.environ["DAERT_SANDBOX_PACKAGES_DIR"])


def host_path_pattern(paths: set[str]) -> re.Pattern[str]:
    """Any of `paths` as a whole path or a path's start (`/root` matches `/root/x`, not
    `/rootfs`), as /proc/self/mountinfo and /proc/self/mounts write them."""
    escaped = sorted((re.escape(p.replace(" ", "\\040")) for p in paths), key=len, reverse=True)
    return re.compile(rf"(?<![^\s=,:])({'|'.join(escaped)})(?=[/\s,]|$)", re.M)


async def test_mounts_name_no_host_path(sandbox: ServerProcess) -> None:
    """Every mount the code can list names no host path that says where the service lives:
    its checkout and install location, its venv, the home folder, the state folder. The
    allowed packages' folder shows only as the source ("root" field) of its own mount, which
    bubblewrap cannot hide (see drivers.bubblewrap)."""
    packages = packages_dir()
    forbidden = real_paths(
        str(REPO),
        daert.__path__[0],  # the install location
        sys.prefix,  # the venv
        os.environ["HOME"],
        os.environ.get("DAERT_STATE_DIR", ".daert/state"),
        packages,
    )
    reply = await execute(
        sandbox,
        """
        for name in ("/proc/self/mountinfo", "/proc/self/mounts", "/proc/1/mountinfo"):
            print(open(name).read(), end="")
        """,
    )
    assert reply.exit_code == 0, reply.stderr
    mountinfo = [line.split() for line in reply.stdout.splitlines() if " - " in line]
    assert any(fields[4] == "/opt/daert/agent.py" for fields in mountinfo), reply.stdout
    # The one mount allowed to show the packages' folder: as its root, at a neutral place.
    shown = [
        line
        for line in reply.stdout.splitlines()
        if not (line.split()[3:5] == [packages, "/opt/daert/packages"] and " - " in line)
    ]
    leaks = host_path_pattern(forbidden).findall("\n".join(shown))
    assert not leaks, f"host paths {sorted(set(leaks))} in:\n{reply.stdout}"
    await assert_still_serving(sandbox)


async def test_service_environment_is_not_visible(sandbox: ServerProcess) -> None:
    assert sandbox.process is not None  # the service does hold the secret
    assert f"{SECRET_ENV}={SECRET}".encode() in read_host_file(
        f"/proc/{sandbox.process.pid}/environ"
    )
    reply = await execute(
        sandbox,
        """
        import os
        print("ENV", sorted(os.environ))
        print("VALUES", dict(os.environ))
        for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
            for part in ("environ", "cmdline"):
                try:
                    print(pid, part, open(f"/proc/{pid}/{part}", "rb").read())
                except OSError as exc:
                    print(pid, part, "DENIED", type(exc).__name__)
        """,
    )
    assert reply.exit_code == 0, reply.stderr
    output = reply.stdout + reply.stderr
    assert SECRET not in output
    assert "DAERT_" not in output
    names = ast.literal_eval(re.search(r"^ENV (\[.*\])$", reply.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert set(names) <= ALLOWED_ENV, set(names) - ALLOWED_ENV
    await assert_still_serving(sandbox)


async def test_privileged_syscalls_fail(sandbox: ServerProcess) -> None:
    reply = await execute(
        sandbox,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        def report(name, result):
            print(name, result, os.strerror(ctypes.get_errno()) if result == -1 else "")
        report("unshare-user", libc.unshare(0x10000000))
        report("unshare-net", libc.unshare(0x40000000))
        report("unshare-mount", libc.unshare(0x00020000))
        report("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        report("ptrace-attach-1", libc.ptrace(16, 1, None, None))
        report("setuid-0", libc.setuid(0))
        report("chroot", libc.chroot(b"/tmp"))
        report("sethostname", libc.sethostname(b"pwned", 5))
        print("uid", os.getuid(), os.geteuid())
        """,
    )
    assert reply.exit_code == 0, reply.stderr
    results = {line.split()[0]: line.split()[1] for line in reply.stdout.splitlines()}
    for call in ("unshare-user", "unshare-net", "unshare-mount", "mount", "ptrace-attach-1",
                 "setuid-0", "chroot", "sethostname"):  # fmt: skip
        assert results[call] == "-1", (call, reply.stdout)
    assert int(results["uid"]) >= UID_BASE
    await assert_still_serving(sandbox)


async def test_sessions_cannot_see_each_other(sandbox: ServerProcess) -> None:
    async with SandboxClient(sandbox.target) as client:
        a = (await client.stub.CreateSession(sandbox_pb2.CreateSessionRequest())).session_id
        b = (await client.stub.CreateSession(sandbox_pb2.CreateSessionRequest())).session_id
        try:
            wrote = await execute(
                sandbox,
                "import os\nopen('/workspace/a_secret.txt', 'w').write('TOPSECRET-A')\n"
                "open('/tmp/a_secret.txt', 'w').write('TOPSECRET-A')\n"
                "A_SECRET = 'TOPSECRET-A'\nprint('UID', os.getuid())",
                session_id=a,
            )
            assert wrote.exit_code == 0, wrote.stderr
            snooped = await execute(
                sandbox,
                """
                import os
                print("UID", os.getuid())
                for path in ("/workspace/a_secret.txt", "/tmp/a_secret.txt"):
                    try:
                        print("READ", open(path).read())
                    except OSError as exc:
                        print("DENIED", path, type(exc).__name__)
                pids = sorted(p for p in os.listdir("/proc") if p.isdigit())
                print("PIDS", len(pids))
                found = []
                roots = ["/workspace", "/tmp"] + [f"/proc/{p}/{s}" for p in pids
                                                  for s in ("root/workspace", "root/tmp", "cwd")]
                for top in roots:
                    for folder, _dirs, names in os.walk(top):
                        for name in names:
                            try:
                                found.append(open(os.path.join(folder, name), "rb").read(100))
                            except OSError:
                                pass
                print("FOUND", found)
                print("GLOBAL", "A_SECRET" in globals())
                """,
                session_id=b,
            )
        finally:
            for sid in (a, b):
                await client.stub.CloseSession(sandbox_pb2.CloseSessionRequest(session_id=sid))
    assert snooped.exit_code == 0, snooped.stderr
    assert "TOPSECRET-A" not in snooped.stdout + snooped.stderr
    assert "READ" not in snooped.stdout
    assert "GLOBAL False" in snooped.stdout
    pids = int(re.search(r"PIDS (\d+)", snooped.stdout).group(1))  # type: ignore[union-attr]
    assert pids <= 3, "a sandbox sees only its own processes"
    uid_a = re.search(r"UID (\d+)", wrote.stdout).group(1)  # type: ignore[union-attr]
    uid_b = re.search(r"UID (\d+)", snooped.stdout).group(1)  # type: ignore[union-attr]
    assert uid_a != uid_b, "each sandbox runs as a uid of its own"
    await assert_still_serving(sandbox)
