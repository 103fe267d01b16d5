"""`daert up` (what `make up` runs): supervised services, health, a first call, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import free_port


def test_up_serves_every_service_and_stops_cleanly(grpcurl: Path, tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "DAERT_EMBEDDING_PORT": str(grpc_port),
        "DAERT_EMBEDDING_METRICS_PORT": str(metrics_port),
    }
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
        assert f"embedding    grpc localhost:{grpc_port}" in banner
        assert f"http://localhost:{metrics_port}/metrics" in banner
        assert "grpcurl -plaintext" in banner

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

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        assert "[daert up] stopped" in Path(out.name).read_text()
        # No service process outlives the supervisor.
        survivors = subprocess.run(
            ["pgrep", "-s", str(up.pid)], capture_output=True, text=True
        ).stdout.split()
        assert survivors == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
