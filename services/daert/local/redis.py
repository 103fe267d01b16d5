"""An embedded Redis: Debian's `redis-server` as a child process on a loopback port.

`daert up` runs one for the generation cache and the LoRA router when no Redis is
configured, and the tests run their own. Snapshots go to `data_dir` when `persist` is set.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from daert.local.child import free_port, terminate, wait_ready


class EmbeddedRedis:
    """A redis-server on 127.0.0.1; `stop` and `start` again keep the same port, so clients
    configured with `url` reconnect by themselves."""

    def __init__(self, data_dir: Path, *, port: int = 0, persist: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.persist = persist
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server; "
                "`make setup` does it as root)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.data_dir / "redis.log"
        # RDB snapshots only when asked: a cache and load counters lose nothing that matters.
        save = ["--save", "60 1"] if self.persist else ["--save", ""]
        command = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--logfile", str(log_file),
            *save,
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            wait_ready(self._process, self._answers_ping, "redis-server", log_file, timeout_s, 0.02)
        except RuntimeError:
            self.stop()
            raise
        return self.url

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: redis-server saves a snapshot first when persisting (idempotent)."""
        process, self._process = self._process, None
        terminate(process)
