"""`daert up` (what `make up` runs): supervised services, the embedded LLM, Airflow and the
gateway, health, first calls through grpcurl and the openai SDK, the ingestion DAG triggered
through Airflow's REST API, a clean stop, and a crash that stops the stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from daert.runtime.registry import SERVICES

from tests.helpers import free_port

# The addresses `up` fills in itself when they are unset.
_STARTED_BY_UP = (
    "DAERT_RETRIEVAL_DSN", "DAERT_LORA_DSN", "DAERT_GENERATION_REDIS_URL", "DAERT_LORA_REDIS_URL",
    "DAERT_CONTEXT_REDIS_URL", "DAERT_GENERATION_MODELS", "DAERT_CONTEXT_TOKENIZERS",
    "DAERT_GATEWAY_DSN", "DAERT_GATEWAY_REDIS_URL",
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
def daert_up(tmp_path: Path, *args: str, **env_vars: str) -> Iterator[Stack]:
    env = dict(os.environ)
    ports: dict[str, Any] = {}
    for service in SERVICES:  # free ports, so a stack already running here is no obstacle
        ports[service] = (free_port(), free_port())
        env[f"DAERT_{service.upper()}_PORT"] = str(ports[service][0])
        env[f"DAERT_{service.upper()}_METRICS_PORT"] = str(ports[service][1])
    ports["llm"] = free_port()
    env["DAERT_LLM_PORT"] = str(ports["llm"])
    ports["airflow"] = free_port()
    env["DAERT_AIRFLOW_PORT"] = str(ports["airflow"])
    ports["gateway"] = (free_port(), free_port())
    env["DAERT_GATEWAY_PORT"], env["DAERT_GATEWAY_METRICS_PORT"] = map(str, ports["gateway"])
    for service in SERVICES:  # the gateway finds the services the way `up` tells it
        env.pop(f"DAERT_{service.upper()}_TARGET", None)
    for var in _STARTED_BY_UP:
        env.pop(var, None)
    env.update(env_vars, DAERT_STATE_DIR=str(tmp_path / "state"))
    out = tmp_path / "up.out"
    with out.open("w") as sink:
        up = subprocess.Popen(
            [sys.executable, "-m", "daert", "up", *args],
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
        # SIGTERM first: `up` stops Airflow's components, which run in process groups of
        # their own and would outlive a SIGKILL of `up`'s group.
        if up.poll() is None:
            up.terminate()
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                subprocess.run(["pkill", "-KILL", "-s", str(up.pid)], check=False)
                up.wait()


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
        assert f"airflow      http http://localhost:{stack.ports['airflow']}" in banner
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

        # The gateway, with the development key the banner prints, in front of the real LLM.
        key = (tmp_path / "state" / "gateway" / "dev-key").read_text().strip()
        gateway_url = f"http://localhost:{port['gateway'][0]}"
        assert f"gateway      http {gateway_url}" in banner and f"API key {key}" in banner
        assert f'OpenAI(base_url="{gateway_url}/v1", api_key="{key}")' in banner
        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        assert answer.choices[0].message.content and answer.usage is not None
        assert 0 < answer.usage.completion_tokens <= 8
        streamed = client.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()
        vector = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello").data[0]
        assert len(vector.embedding) == 384
        assert httpx.get(f"{gateway_url}/readyz").status_code == 200

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
        DAERT_AIRFLOW_ENABLED="false",
        DAERT_GENERATION_MODELS=json.dumps([{"name": "llama3.2", "url": dead}]),
        DAERT_CONTEXT_TOKENIZERS=json.dumps(
            [{"name": "llama3.2", "kind": "llama_cpp", "url": dead}]
        ),
    ) as stack:
        banner = stack.text()
        assert "no embedded LLM" in banner and "llm          http" not in banner
        assert "airflow      http" not in banner
        lines = stack.banner_lines()
        for service in ("generation", "context"):
            row = next(
                i for i, line in enumerate(lines) if line.startswith(f"  {service:<12} grpc")
            )
            assert "NOT_SERVING" in lines[row + 1]
        assert sum("NOT_SERVING" in line for line in lines) == 2
        # The gateway is up all the same, and says what is missing.
        ready = httpx.get(f"http://localhost:{stack.ports['gateway'][0]}/readyz")
        assert ready.status_code == 503 and ready.json()["services"]["generation"] == "NOT_SERVING"
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


def _trigger(api: httpx.Client, conf: dict[str, Any]) -> str:
    started = api.post(
        "/api/v2/dags/daert_ingest/dagRuns", json={"logical_date": None, "conf": conf}
    )
    assert started.status_code == 200, started.text
    return str(started.json()["dag_run_id"])


def _tasks(api: httpx.Client, run: str) -> list[dict[str, Any]]:
    reply = api.get(f"/api/v2/dags/daert_ingest/dagRuns/{run}/taskInstances").json()
    return list(reply["task_instances"])


def _result(api: httpx.Client, run: str) -> dict[str, Any]:
    """The run's summary: the return value of its last task."""
    path = f"/api/v2/dags/daert_ingest/dagRuns/{run}/taskInstances/summarize/xcomEntries"
    return dict(api.get(f"{path}/return_value").json()["value"])


def _await_run(api: httpx.Client, run: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = api.get(f"/api/v2/dags/daert_ingest/dagRuns/{run}").json()["state"]
        if state in ("success", "failed") or time.monotonic() > deadline:
            return str(state)
        time.sleep(1.0)


def test_up_runs_airflow_and_its_ingestion_dag_over_the_rest_api(
    grpcurl: Path, tmp_path: Path
) -> None:
    with daert_up(tmp_path, "--only", "embedding", "retrieval") as stack:
        banner = stack.text()
        url = f"http://localhost:{stack.ports['airflow']}"
        assert f"airflow      http {url}" in banner
        login = re.search(r"log in as admin / (\S+) \(kept in (\S+)\)", banner)
        assert login, banner
        assert json.loads(Path(login[2]).read_text()) == {"admin": login[1]}
        # The metadata is in PostgreSQL (a database of its own), not SQLite.
        assert not list((tmp_path / "state" / "airflow").glob("*.db"))

        # The DAG's default source is the documents folder the banner names.
        documents = tmp_path / "state" / "documents"
        assert f"drop documents into {documents}" in banner
        (documents / "runbooks").mkdir()
        (documents / "runbooks" / "retries.md").write_text(
            "# Retries\n\nThe ingestion worker retries a failed upload with a zephyrine "
            "backoff of five seconds.\n"
        )
        (documents / "notes.txt").write_text("Plain notes about the staging cluster.\n")

        with httpx.Client(base_url=url, timeout=30) as ui:
            assert "<html" in ui.get("/").text.lower()
            token = ui.post("/auth/token", json={"username": "admin", "password": login[1]})
            assert token.status_code == 201, token.text
            assert ui.get("/api/v2/dags").status_code == 401  # no token, no API
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
            deadline = time.monotonic() + 120
            while api.get("/api/v2/dags/daert_ingest").status_code != 200:
                assert time.monotonic() < deadline, "the DAG processor never parsed dags/"
                time.sleep(1.0)
            assert api.get("/api/v2/importErrors").json()["total_entries"] == 0
            run = _trigger(api, {"collection": "runbooks"})
            assert _await_run(api, run, 240) == "success", stack.text()
            summary = _result(api, run)
            batches = [t for t in _tasks(api, run) if t["task_id"] == "ingest_batch"]
            # Nothing changed since: the next run maps no batch at all.
            again = _trigger(api, {"collection": "runbooks"})
            assert _await_run(api, again, 240) == "success", stack.text()
            unchanged = _result(api, again)
            states = {t["task_id"]: t["state"] for t in _tasks(api, again)}
        assert summary["new"] == 2 and summary["failed"] == 0, summary
        # The UI labels each mapped batch with the files in it.
        labels = [t["rendered_map_index"] for t in batches]
        assert len(labels) == 1 and "notes.txt" in labels[0] and "retries.md" in labels[0], labels
        assert (unchanged["unchanged"], unchanged["chunks_embedded"]) == (2, 0), unchanged
        assert states["ingest_batch"] == "skipped" and states["summarize"] == "success", states

        hits = grpcurl_call(
            grpcurl, stack.ports["retrieval"][0], "daert.v1.RetrievalService/Search",
            {"collection": "runbooks", "query_text": "zephyrine backoff"},
        )["hits"]  # fmt: skip
        assert hits[0]["chunk"]["metadata"]["source_uri"].endswith("runbooks/retries.md")

        # Airflow is supervised like the services: a dead scheduler stops the stack.
        scheduler = subprocess.run(
            ["pgrep", "-s", str(stack.process.pid), "-f", "airflow scheduler"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        os.kill(int(scheduler[0]), signal.SIGKILL)
        assert stack.process.wait(90) == 1
        assert "airflow exited; stopping the rest" in stack.text()
        # The killed scheduler's task runners are gone too; zombies left by its death (dead,
        # waiting for init to reap them) do not count.
        session = subprocess.run(
            ["ps", "-o", "stat=,pid=,args=", "-s", str(stack.process.pid)],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        assert [p for p in session if not p.startswith("Z")] == []
