"""The planner DAG through the real Airflow (api-server, scheduler, dag-processor, triggerer
on an embedded PostgreSQL, LocalExecutor) and the real generation service in front of the
fake OpenAI-compatible server, whose llm replies all take the same time. In one run:

1. Parallel: a plan of 1 root, k independent llm tasks on it, and 1 answer on them all.
2. Sequential: the same k tasks one after another (each on the one before).
3. The speedup of the independent part: the k tasks' span (first start to last end) when
   sequential over the same when parallel; goal >= 0.75 k.
4. The planner overhead: from the trigger (the run's queueing) to the first planned task's
   start, which covers planning (one model call), the approval step and Airflow scheduling.

    make bench            # or: PYTHONPATH=. python bench/planner_bench.py --k 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from daert.local.airflow import AirflowSettings, EmbeddedAirflow, create_database
from daert.local.child import free_port
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess

from tests.fakes.openai import FakeOpenAI

DAG = "/api/v2/dags/daert_plan"
MODEL = "bench-model"
TOKEN_DELAY_S = 0.25


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step(id: str, kind: str, deps: list[str]) -> dict[str, Any]:
    return {"id": id, "kind": kind, "instruction": f"Do {id}", "depends_on": deps, "references": []}


def plans(k: int) -> dict[str, dict[str, Any]]:
    """The two plans by objective: k tasks on the root, or the same k in a chain."""
    work = [f"work_{i}" for i in range(k)]
    fan = [step("root", "llm", []), *(step(w, "llm", ["root"]) for w in work)]
    chain = [step("root", "llm", [])]
    chain += [step(w, "llm", ["root"] if i == 0 else [work[i - 1]]) for i, w in enumerate(work)]
    return {
        "parallel": {"tasks": [*fan, step("end", "answer", work)]},
        "sequential": {"tasks": [*chain, step("end", "answer", [work[-1]])]},
    }


def scripted(k: int, words: int) -> Any:
    by_objective = plans(k)

    def reply(prompt: str) -> list[str]:
        if "You plan work for an objective" in prompt:
            objective = next(o for o in by_objective if f"Objective: {o}" in prompt)
            return [json.dumps(by_objective[objective])]
        return ["done", *[" ok"] * (words - 1)]

    return reply


def run_plan(
    api: httpx.Client, objective: str, tasks: int, timeout_s: float
) -> tuple[str, dict[str, Any]]:
    conf = {"objective": objective, "model": MODEL, "max_tasks": tasks}
    started = api.post(f"{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
    started.raise_for_status()
    run = str(started.json()["dag_run_id"])
    deadline = time.monotonic() + timeout_s
    while (state := api.get(f"{DAG}/dagRuns/{run}").json()["state"]) not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run} not done in {timeout_s:g} s")
        time.sleep(0.5)
    path = f"{DAG}/dagRuns/{run}/taskInstances/report/xcomEntries/report"
    report = dict(api.get(path).json()["value"])
    if state != "success":
        raise RuntimeError(f"run {run} {state}: {report['status']}, not done {report['not_done']}")
    return run, report


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def span(report: dict[str, Any], ids: list[str]) -> float:
    """First start to last end of the tasks `ids`, as the tasks recorded them."""
    tasks = [t for t in report["tasks"] if t["id"] in ids]
    return max(seconds(t["ended_at"]) for t in tasks) - min(seconds(t["started_at"]) for t in tasks)


def overhead(api: httpx.Client, run: str, report: dict[str, Any]) -> float:
    """Trigger (the run's queueing) to the start of the first planned task."""
    queued = seconds(api.get(f"{DAG}/dagRuns/{run}").json()["queued_at"])
    return min(seconds(t["started_at"]) for t in report["tasks"]) - queued


def main(k: int, latency_s: float, run_timeout_s: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    words = max(1, round(latency_s / TOKEN_DELAY_S) - 1)  # EOS is paced too
    with ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="planner-bench-")))
        fake = stack.enter_context(FakeOpenAI(models=["fake/bench"], max_model_len=8192))
        fake.reply_fn = scripted(k, words)
        fake.token_delay_s = TOKEN_DELAY_S
        models = [
            {"name": MODEL, "backend": "openai", "url": fake.url, "upstream_model": "fake/bench",
             "context_length": 8192, "supports_structured_output": True},
        ]  # fmt: skip
        generation = stack.enter_context(
            ServerProcess("generation", {"DAERT_GENERATION_MODELS": json.dumps(models)})
        )
        generation.wait_health("SERVING", 120)
        log("starting PostgreSQL and Airflow (migrations, four components; about a minute)")
        postgres = EmbeddedPostgres(state / "pgdata")
        dsn = postgres.start()
        stack.callback(postgres.stop)
        airflow = EmbeddedAirflow(
            AirflowSettings(port=free_port(), dags_folder=Path("dags"), parallelism=max(4, k)),
            state / "airflow",
            create_database(dsn),
            extra_env={"DAERT_GENERATION_TARGET": generation.target},
        )
        stack.callback(airflow.stop)
        airflow.start()
        api = stack.enter_context(httpx.Client(base_url=airflow.url, timeout=30))
        token = api.post(
            "/auth/token", json={"username": "admin", "password": airflow.admin_password()}
        )
        token.raise_for_status()
        api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        deadline = time.monotonic() + 180
        while api.get(DAG).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the DAG was never parsed; see {airflow.log_dir}")
            time.sleep(0.5)

        work = [f"work_{i}" for i in range(k)]
        log(f"parallel plan: root, {k} independent llm tasks, answer")
        fan_run, fan = run_plan(api, "parallel", k + 2, run_timeout_s)
        log(f"sequential plan: root, the same {k} tasks in a chain, answer")
        chain_run, chain = run_plan(api, "sequential", k + 2, run_timeout_s)

        parallel_s, sequential_s = span(fan, work), span(chain, work)
        one_s = sum(t["duration_s"] for t in chain["tasks"] if t["id"] in work) / k
        speedup = sequential_s / parallel_s
        print(
            f"\nplanner DAG daert_plan through Airflow {version('apache-airflow')} "
            f"(LocalExecutor, parallelism {max(4, k)}); llm replies of {latency_s:g} s (fake)"
        )
        whole = [span(r, [t["id"] for t in r["tasks"]]) for r in (fan, chain)]
        before = [overhead(api, run, r) for run, r in ((fan_run, fan), (chain_run, chain))]
        rows = [
            ("one llm task (mean, sequential run)", f"{one_s:7.2f} s"),
            (f"{k} independent tasks, parallel", f"{parallel_s:7.2f} s  (first start to last end)"),
            (f"the same {k}, one after another", f"{sequential_s:7.2f} s"),
            ("speedup of the independent part", f"{speedup:7.2f} x  (goal >= {0.75 * k:.2f})"),
            ("whole plan, parallel", f"{whole[0]:7.2f} s  (first task start to last end)"),
            ("whole plan, sequential", f"{whole[1]:7.2f} s"),
            (
                "planner overhead, parallel run",
                f"{before[0]:7.2f} s  (trigger to first task start)",
            ),
            ("planner overhead, sequential run", f"{before[1]:7.2f} s"),
            ("  of which planning (model call)", f"{fan['planning']['seconds']:7.2f} s"),
        ]
        for name, value in rows:
            print(f"  {name + ':':<38} {value}")
        log("stopping Airflow, the services and PostgreSQL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="independent llm tasks")
    parser.add_argument("--latency", type=float, default=4.0, help="seconds per llm reply")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds per DAG run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop every process
    main(args.k, args.latency, args.run_timeout)
