"""What every embedded server (Redis, Weaviate, the LLM) does with its child process:
wait until it answers, fail with its log's name if it dies first, and stop it."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    what: str,
    log_file: Path,
    timeout_s: float,
    pause_s: float = 0.1,
) -> None:
    """Return once `ready()`; RuntimeError naming `what` and its log when the process exits
    first or `timeout_s` passes (the caller stops it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"{what} exited with code {code} while starting; see {log_file}")
        if ready():
            return
        time.sleep(pause_s)
    raise RuntimeError(f"{what} was not ready within {timeout_s:g} s; see {log_file}")


def terminate(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s` (nothing when it has already ended)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
