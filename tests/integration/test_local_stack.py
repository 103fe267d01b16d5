"""`daert up` (what `make up` runs): supervised services and the embedded LLM, health, first
calls through grpcurl, a clean stop, and a crash that stops the stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daert.runtime.registry import SERVICES

from tests.helpers import free_port

# The addresses `up` fills in itself when they are unset.
_STARTED_BY_UP = (
    "DAERT_RETRIEVAL_DSN", "DAERT_LORA_DSN", "DAERT_GENERATION_REDIS_URL", "DAERT_LORA_REDIS_URL",
    "DAERT_CONTEXT_REDIS_URL", "DAERT_GENERATION_MODELS", "DAERT_CONTEXT_TOKENIZERS",
)  # fmt: skip


class Stack:
    def __init__(self, process: subprocess.Popen[bytes], out: Path, ports: dict[str, Any]):
        self.process, self.out, self.ports = process, out, ports

    def text(self) -> str:
        return self.out.read_text()

    def banner_lines(self) -> list[str]:
        lines = self.text().splitlines()
        return lines[lines.index("daert stack is up:") :]


@contextmanager
def daert_up(tmp_path: Path, **env_vars: str) -> Iterator[Stack]:
    env = dict(os.environ)
    ports: dict[str, Any] = {}
    for service in SERVICES:  # free ports, so a stack already running here is no obstacle
        ports[service] = (free_port(), free_port())
        env[f"DAERT_{service.upper()}_PORT"] = str(ports[service][0])
        env[f"DAERT_{service.upper()}_METRICS_PORT"] = str(ports[service][1])
    ports["llm"] = free_port()
    env["DAERT_LLM_PORT"] = str(ports["llm"])
    for var in _STARTED_BY_UP:
        env.pop(var, None)
    env.update(env_vars, DAERT_STATE_DIR=str(tmp_path / "state"))
    out = tmp_path / "up.out"
    with out.open("w") as sink:
        up = subprocess.Popen(
            [sys.executable, "-m", "daert", "up"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = Stack(up, out, ports)
    try:
        deadline = time.monotonic() + 300
        while "daert stack is up" not in stack.text():
            assert up.poll() is None, stack.text()
            assert time.monotonic() < deadline, "stack not up in time"
            time.sleep(0.2)
        yield stack
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def grpcurl_call(grpcurl: Path, port: int, method: str, body: object) -> Any:
    result = subprocess.run(
        [str(grpcurl), "-plaintext", "-d", json.dumps(body), f"localhost:{port}", method],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)


def test_up_serves_all_seven_services_over_the_embedded_llm(grpcurl: Path, tmp_path: Path) -> None:
    with daert_up(tmp_path) as stack:
        banner = stack.text()
        for service in SERVICES:
            service_port, service_metrics = stack.ports[service]
            assert f"{service:<12} grpc localhost:{service_port}" in banner
            assert f"http://localhost:{service_metrics}/metrics" in banner
        assert len(SERVICES) == 7
        assert f"llm          http http://127.0.0.1:{stack.ports['llm']}" in banner
        # Every service SERVING, generation included: its model is the embedded LLM.
        assert not any("NOT_SERVING" in line for line in stack.banner_lines()), banner
        assert "grpcurl -plaintext" in banner and "started Redis at redis://127.0.0.1:" in banner

        port = stack.ports
        reply = grpcurl_call(
            grpcurl, port["generation"][0], "daert.v1.GenerationService/Generate",
            {"messages": [{"role": "ROLE_USER", "content": "Say hello."}],
             "params": {"temperature": 0, "max_tokens": 8}},
        )  # fmt: skip
        assert reply["text"].strip() and reply["model"] == "gemma-3-270m"
        assert 0 < reply["usage"]["completion_tokens"] <= 8, reply

        turns = [
            {"role": "ROLE_USER" if i % 2 == 0 else "ROLE_ASSISTANT",
             "content": f"Turn {i}: the order number is {4000 + i} and it ships on day {i}."}
            for i in range(60)
        ]  # fmt: skip
        conversation = [{"role": "ROLE_SYSTEM", "content": "You track orders."}, *turns]
        reply = grpcurl_call(
            grpcurl, port["context"][0], "daert.v1.ContextService/Compress",
            {"messages": conversation, "tokenBudget": 200,
             "strategy": "COMPRESSION_STRATEGY_TRUNCATE"},
        )  # fmt: skip
        assert reply["tokens_before"] > 200 >= reply["tokens_after"]
        assert reply["messages"][0] == conversation[0] and reply["messages"][-1] == turns[-1]

        assert grpcurl_call(
            grpcurl, port["embedding"][0], "daert.v1.EmbeddingService/Embed",
            {"inputs": ["hello world"], "dimensions": 8},
        )["dimensions"] == 8  # fmt: skip
        assert grpcurl_call(
            grpcurl, port["sandbox"][0], "daert.v1.SandboxService/Execute",
            {"code": "print(6 * 7)"},
        )["stdout"] == "42\n"  # fmt: skip
        assert grpcurl_call(
            grpcurl, port["retrieval"][0], "daert.v1.RetrievalService/CreateCollection",
            {"collection": "notes", "dimensions": 3},
        )["created"] is True  # fmt: skip
        assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()
        # The LoRA router has its registry in the same embedded PostgreSQL.
        assert grpcurl_call(
            grpcurl, port["lora"][0], "daert.v1.LoraRouterService/ListAdapters", {}
        ) == {}  # fmt: skip

        # The LLM is supervised like the services: when it dies, the stack stops.
        llm = subprocess.run(
            ["pgrep", "-s", str(stack.process.pid), "-f", "llama-server"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert len(llm) == 1
        os.kill(int(llm[0]), signal.SIGKILL)
        assert stack.process.wait(60) == 1
        assert "llm exited; stopping the rest" in stack.text()
        survivors = subprocess.run(
            ["pgrep", "-s", str(stack.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert survivors == []
        assert not (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()


def test_up_with_your_own_models_runs_no_llm_and_stops_cleanly(
    grpcurl: Path, tmp_path: Path
) -> None:
    # A model server that is not there: generation and context wait for it.
    dead = f"http://127.0.0.1:{free_port()}"
    with daert_up(
        tmp_path,
        DAERT_GENERATION_MODELS=json.dumps([{"name": "llama3.2", "url": dead}]),
        DAERT_CONTEXT_TOKENIZERS=json.dumps(
            [{"name": "llama3.2", "kind": "llama_cpp", "url": dead}]
        ),
    ) as stack:
        banner = stack.text()
        assert "no embedded LLM" in banner and "llm          http" not in banner
        lines = stack.banner_lines()
        for service in ("generation", "context"):
            row = next(
                i for i, line in enumerate(lines) if line.startswith(f"  {service:<12} grpc")
            )
            assert "NOT_SERVING" in lines[row + 1]
        assert sum("NOT_SERVING" in line for line in lines) == 2
        # The reason is the service's own log line, above the banner.
        reasons = [
            json.loads(line)
            for line in banner.splitlines()
            if line.startswith("{") and "generation model not ready" in line
        ]
        assert reasons and f"Ollama at {dead} is unreachable" in reasons[0]["reason"]

        stack.process.send_signal(signal.SIGTERM)
        assert stack.process.wait(60) == 0
        assert "[daert up] stopped" in stack.text()
        # No service process outlives the supervisor, nor the embedded PostgreSQL.
        survivors = subprocess.run(
            ["pgrep", "-s", str(stack.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert survivors == []
        assert not (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()
