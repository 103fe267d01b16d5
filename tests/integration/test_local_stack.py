"""`daert up` (what `make up` runs): supervised services, health, a first call, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daert.runtime.registry import SERVICES

from tests.helpers import free_port


def test_up_serves_every_service_and_stops_cleanly(grpcurl: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    ports = {}
    for service in SERVICES:  # free ports, so a stack already running here is no obstacle
        ports[service] = (free_port(), free_port())
        env[f"DAERT_{service.upper()}_PORT"] = str(ports[service][0])
        env[f"DAERT_{service.upper()}_METRICS_PORT"] = str(ports[service][1])
    grpc_port = ports["embedding"][0]
    for var in ("DAERT_RETRIEVAL_DSN", "DAERT_LORA_DSN", "DAERT_GENERATION_REDIS_URL",
                "DAERT_LORA_REDIS_URL"):  # fmt: skip
        env.pop(var, None)  # so that `up` starts its embedded PostgreSQL and Redis
    # The default Ollama at localhost:11434 may or may not run here: point at none.
    ollama_url = f"http://127.0.0.1:{free_port()}"
    env["DAERT_GENERATION_MODELS"] = json.dumps([{"name": "llama3.2", "url": ollama_url}])
    env["DAERT_STATE_DIR"] = str(tmp_path / "state")
    out = (tmp_path / "up.out").open("w+")
    up = subprocess.Popen(
        [sys.executable, "-m", "daert", "up"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while "daert stack is up" not in Path(out.name).read_text():
            assert up.poll() is None, Path(out.name).read_text()
            assert time.monotonic() < deadline, "stack not up in time"
            time.sleep(0.2)
        banner = Path(out.name).read_text()
        for service, (service_port, service_metrics) in ports.items():
            assert f"{service:<12} grpc localhost:{service_port}" in banner
            assert f"http://localhost:{service_metrics}/metrics" in banner
        assert "grpcurl -plaintext" in banner
        # Generation waits for an LLM server outside the stack: up, but NOT_SERVING, and why.
        lines = banner.splitlines()
        row = next(i for i, line in enumerate(lines) if line.startswith("  generation   grpc"))
        assert "NOT_SERVING" in lines[row + 1]
        # Every other service is SERVING: generation's is the banner's only NOT_SERVING line.
        table = lines[lines.index("daert stack is up:") :]
        assert sum("NOT_SERVING" in line for line in table) == 1
        # The reason is the service's own log line, above the banner.
        reasons = [
            json.loads(line)
            for line in lines
            if line.startswith("{") and "generation model not ready" in line
        ]
        assert reasons, banner
        assert f"Ollama at {ollama_url} is unreachable" in reasons[0]["reason"]
        assert "started Redis at redis://127.0.0.1:" in banner

        result = subprocess.run(
            [
                str(grpcurl),
                "-plaintext",
                "-d",
                '{"inputs": ["hello world"], "dimensions": 8}',
                f"localhost:{grpc_port}",
                "daert.v1.EmbeddingService/Embed",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(result.stdout)["dimensions"] == 8
        result = subprocess.run(
            [
                str(grpcurl),
                "-plaintext",
                "-d",
                '{"code": "print(6 * 7)"}',
                f"localhost:{ports['sandbox'][0]}",
                "daert.v1.SandboxService/Execute",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(result.stdout)["stdout"] == "42\n"
        result = subprocess.run(
            [
                str(grpcurl),
                "-plaintext",
                "-d",
                '{"collection": "notes", "dimensions": 3}',
                f"localhost:{ports['retrieval'][0]}",
                "daert.v1.RetrievalService/CreateCollection",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(result.stdout)["created"] is True
        assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()
        # The LoRA router has its registry in the same embedded PostgreSQL.
        result = subprocess.run(
            [
                str(grpcurl),
                "-plaintext",
                "-d",
                "{}",
                f"localhost:{ports['lora'][0]}",
                "daert.v1.LoraRouterService/ListAdapters",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(result.stdout) == {}

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        assert "[daert up] stopped" in Path(out.name).read_text()
        # No service process outlives the supervisor.
        survivors = subprocess.run(
            ["pgrep", "-s", str(up.pid)], capture_output=True, text=True
        ).stdout.split()
        assert survivors == []
        # The embedded PostgreSQL was stopped too.
        assert not (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
