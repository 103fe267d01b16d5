"""The `process` driver (for a gVisor pod on Kubernetes): the same agent and API under
rlimits alone. Functional checks only: its isolation is the pod's, not ours."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from daert.clients import SandboxClient
from daert.testing import ServerProcess
from daert.v1 import sandbox_pb2


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(
        "sandbox", {"DAERT_SANDBOX_DRIVER": "process", "DAERT_SANDBOX_POOL_SIZE": "1"}
    ) as process:
        process.wait_health("SERVING", timeout_s=60)
        yield process


async def execute(
    server: ServerProcess, code: str, **fields: object
) -> sandbox_pb2.ExecuteResponse:
    async with SandboxClient(server.target) as client:
        return await client.stub.Execute(sandbox_pb2.ExecuteRequest(code=code, **fields))


async def test_runs_code_with_an_empty_environment(server: ServerProcess) -> None:
    reply = await execute(server, "import os\nprint('DAERT' in ' '.join(os.environ))\n6 * 7")
    assert reply.stdout == "False\n"
    assert [(o.mime_type, o.data) for o in reply.outputs] == [("text/plain", b"42")]


async def test_limits_hold(server: ServerProcess) -> None:
    memory = await execute(server, "x = bytearray(8 * 1024**3)")
    assert memory.memory_exceeded
    slow = await execute(
        server, "while True: pass", limits=sandbox_pb2.SandboxLimits(timeout_ms=1000)
    )
    assert slow.timed_out and slow.signal
    assert (await execute(server, "print(1)")).stdout == "1\n"


async def test_files_round_trip(server: ServerProcess) -> None:
    reply = await execute(
        server,
        "open('out.txt', 'w').write(open('in.txt').read().upper())",
        files=[sandbox_pb2.SandboxFile(path="in.txt", content=b"hello")],
    )
    assert [(f.path, f.content) for f in reply.files] == [("out.txt", b"HELLO")]
