"""Run a daert service as a real subprocess on ephemeral ports: for tests and benchmarks.

with ServerProcess("embedding", {"DAERT_EMBEDDING_MODELS": "..."}) as server:
    async with EmbeddingClient(server.target) as client: ...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServerProcess:
    def __init__(self, service: str, env: dict[str, str] | None = None) -> None:
        self.service = service
        prefix = f"DAERT_{service.upper()}_"
        self.env = {
            **os.environ,
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}PORT": "0",
            f"{prefix}METRICS_PORT": "0",
            f"{prefix}HEALTH_INTERVAL_S": "0.2",
            # `start` finds the ports in the INFO line "serving".
            f"{prefix}LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.log_path = Path(tempfile.mkstemp(prefix=f"daert-{service}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.metrics_port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        """The base URL of an HTTP server (the gateway)."""
        return f"http://{self.target}"

    def start(self, timeout_s: float = 120.0) -> Self:
        """Start and wait until the port is bound (not until it is SERVING)."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daert", "serve", self.service],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self.logs():
                if entry.get("msg") == "serving":
                    # The gateway serves HTTP; every other service gRPC.
                    self.grpc_port = int(entry.get("grpc_port") or entry["http_port"])
                    self.metrics_port = int(entry["metrics_port"])
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.service} exited early:\n{self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.service} did not bind a port:\n{self.log_text()}")

    def health(self, service: str = "") -> str:
        with grpc.insecure_channel(self.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def wait_health(self, status: str = "SERVING", timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "?"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.service} exited:\n{self.log_text()}")
            try:
                last = self.health()
            except grpc.RpcError as exc:
                last = str(exc.code())
            if last == status:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.service} health is {last}, not {status}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log entries so far (non-JSON lines, e.g. from libraries, are skipped)."""
        entries = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process is None:
            return 0
        self.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> Self:
        return self if self.process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
