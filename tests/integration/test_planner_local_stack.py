"""The planner DAG in the Airflow of `daert up` (what `make up` runs), triggered over the REST
API as the UI's form does, followed to success, its report read back through the API: with
generation in front of a fake OpenAI-compatible server scripted with the plan, and the
sandbox for its code task."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.openai import FakeOpenAI
from tests.integration.test_local_stack import daert_up

DAG = "/api/v2/dags/daert_plan"
PLAN = {
    "tasks": [
        {"id": "total", "kind": "code", "instruction": "Sum 1 + 2 + 4 + 8 + 16 seconds",
         "depends_on": [], "references": []},
        {"id": "advice", "kind": "llm", "instruction": "Say why backoff helps",
         "depends_on": [], "references": []},
        {"id": "end", "kind": "answer", "instruction": "Answer with $total",
         "depends_on": ["total", "advice"], "references": ["total"]},
    ]
}  # fmt: skip


def reply(prompt: str) -> list[str]:
    if "You plan work for an objective" in prompt:
        return [json.dumps(PLAN)]
    if "Write a Python 3 program" in prompt:
        return ["```python\nprint(sum(2**i for i in range(5)))\n```"]
    return ["The backoff waits 31 s in total."]


def test_up_runs_a_planned_objective_triggered_over_the_rest_api(tmp_path: Path) -> None:
    with FakeOpenAI(models=["fake/planner"]) as fake:
        fake.reply_fn = reply
        model = {"name": "planner", "backend": "openai", "url": fake.url}
        models = [{**model, "upstream_model": "fake/planner", "supports_structured_output": True}]
        with daert_up(
            tmp_path, "--only", "generation", "sandbox", DAERT_GENERATION_MODELS=json.dumps(models)
        ) as stack:
            banner = stack.text()
            login = re.search(r"log in as admin / (\S+) \(kept in (\S+)\)", banner)
            assert login, banner
            url = f"http://localhost:{stack.ports['airflow']}"
            token = httpx.post(
                f"{url}/auth/token", json={"username": "admin", "password": login[1]}
            )
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
                deadline = time.monotonic() + 120
                while api.get(DAG).status_code != 200:
                    assert time.monotonic() < deadline, "the DAG processor never parsed dags/"
                    time.sleep(1.0)
                conf = {"objective": "How long does a 5-step backoff wait?", "model": "planner"}
                started = api.post(f"{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
                assert started.status_code == 200, started.text
                run = started.json()["dag_run_id"]
                assert _await_run(api, run, 300) == "success", stack.text()
                path = f"{DAG}/dagRuns/{run}/taskInstances/report/xcomEntries/report"
                report: dict[str, Any] = api.get(path).json()["value"]
                tasks = api.get(f"{DAG}/dagRuns/{run}/taskInstances").json()["task_instances"]
            # Stopped as Ctrl-C would: daert_up's SIGKILL of the session alone leaves Airflow's
            # components (each in a process group of its own) and PostgreSQL running.
            stack.process.send_signal(signal.SIGTERM)
            assert stack.process.wait(90) == 0, stack.text()
            survivors = subprocess.run(
                ["pgrep", "-s", str(stack.process.pid)], capture_output=True, text=True
            ).stdout.split()
            assert survivors == [], survivors
    assert report["status"] == "succeeded" and report["not_done"] == [], report
    by_id = {t["id"]: t for t in report["tasks"]}
    assert by_id["total"]["output"] == "31\n"
    assert report["answer"] == "The backoff waits 31 s in total."
    # The UI lists each planned task by its id, in the wave of its level.
    labels = {(t["task_id"], t["rendered_map_index"]) for t in tasks if t["state"] == "success"}
    assert {
        ("wave_0", "total (code)"),
        ("wave_0", "advice (llm)"),
        ("wave_1", "end (answer)"),
    } <= labels


def _await_run(api: httpx.Client, run: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = api.get(f"{DAG}/dagRuns/{run}").json()["state"]
        if state in ("success", "failed") or time.monotonic() > deadline:
            return str(state)
        time.sleep(1.0)
