"""Sandbox pieces that need no sandbox: output capture, path and limit validation."""

from __future__ import annotations

import asyncio

import pytest
from daert.runtime.errors import InvalidArgument
from daert.sandbox.config import SandboxSettings
from daert.sandbox.drivers import interpreter_exit_signal
from daert.sandbox.interpreter import _Capture
from daert.sandbox.service import SandboxServicer, _relative_path
from daert.v1 import sandbox_pb2

MARKER = b"\n--end-0123456789abcdef--\n"


async def capture(chunks: list[bytes], limit: int, eof: bool = False) -> tuple[bytes, bool]:
    """Feed `chunks` one read at a time, as a pipe delivers them."""
    stream = asyncio.StreamReader()
    output = _Capture(stream, limit)
    reading = asyncio.ensure_future(output.until(MARKER))
    for chunk in chunks:
        stream.feed_data(chunk)
        await asyncio.sleep(0.001)  # let the reader take this chunk alone
    if eof:
        stream.feed_eof()
    await asyncio.wait_for(reading, 2)
    return output.output, output.truncated


async def test_output_ends_at_the_marker_even_when_split_across_reads() -> None:
    for cut in range(1, len(MARKER)):
        data = b"hello world" + MARKER[:cut]
        rest = MARKER[cut:] + b"next call's output"
        assert await capture([data, rest], limit=100) == (b"hello world", False)


async def test_output_over_the_limit_is_cut_and_flagged_but_the_marker_still_found() -> None:
    assert await capture([b"x" * 5000 + MARKER], limit=10) == (b"x" * 10, True)


async def test_output_without_marker_ends_at_end_of_stream() -> None:
    assert await capture([b"partial \xff output"], limit=100, eof=True) == (
        b"partial \xff output",
        False,
    )


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "", "a\x00b", "..", ".", "a/.."]
)
def test_paths_escaping_the_workspace_are_rejected(path: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _relative_path(path, "files[0].path")
    assert caught.value.field == "files[0].path"


async def test_output_read_so_far_survives_giving_up() -> None:
    stream = asyncio.StreamReader()
    output = _Capture(stream, 100)
    reading = asyncio.ensure_future(output.until(MARKER))
    stream.feed_data(b"bye\n")  # and then the code closed the stream: no marker, no EOF
    await asyncio.sleep(0.01)
    reading.cancel()
    assert output.output == b"bye\n"


def test_paths_are_normalised() -> None:
    assert _relative_path("data/./in.csv", "files[0].path") == "data/in.csv"


def test_limits_take_defaults_and_reject_above_the_ceiling() -> None:
    servicer = SandboxServicer(SandboxSettings())
    limits = servicer._limits(
        sandbox_pb2.SandboxLimits(timeout_ms=500), SandboxSettings().max_limits
    )
    assert limits.timeout_ms == 500
    assert limits.memory_mb == SandboxSettings().default_limits.memory_mb
    with pytest.raises(InvalidArgument) as caught:
        servicer._limits(sandbox_pb2.SandboxLimits(memory_mb=10**6), SandboxSettings().max_limits)
    assert caught.value.field == "limits.memory_mb"


@pytest.mark.parametrize(
    ("driver", "returncode", "signal"),
    [("bubblewrap", 139, 11), ("bubblewrap", 1, 0), ("process", -11, 11), ("process", 0, 0)],
)
def test_exit_signal(driver: str, returncode: int, signal: int) -> None:
    assert interpreter_exit_signal(driver, returncode) == signal
