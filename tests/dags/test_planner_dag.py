"""The planner DAG end to end with `dag.test()`: real Airflow (metadata in PostgreSQL), real
generation (in front of a fake OpenAI-compatible server scripted to return plans, programs
and answers), sandbox, embedding, retrieval and rerank servers. Runs that must show tasks at
the same time use the LocalExecutor (`use_executor=True`, with the api-server fixture)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from daert.testing import ServerProcess

from tests.dags.conftest import DAGS, AirflowApi
from tests.fakes.openai import FakeOpenAI
from tests.rag_corpus import ACME, COLLECTION, load_corpus

pytestmark = pytest.mark.usefixtures("airflow_db", "planner_env")

MODEL = "planner-model"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["fake/planner"], max_model_len=4096) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(fake_llm: FakeOpenAI) -> None:
    fake_llm.reset()


@pytest.fixture(scope="module")
def generation_server(fake_llm: FakeOpenAI) -> Iterator[ServerProcess]:
    models = [
        {
            "name": MODEL,
            "backend": "openai",
            "url": fake_llm.url,
            "upstream_model": "fake/planner",
            "context_length": 4096,
            "supports_structured_output": True,
        }
    ]
    env = {"DAERT_GENERATION_MODELS": json.dumps(models), "DAERT_GENERATION_RETRY_ATTEMPTS": "1"}
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[ServerProcess]:
    if not os.environ.get("DAERT_SANDBOX_PACKAGES_DIR"):
        pytest.fail("DAERT_SANDBOX_PACKAGES_DIR is unset: run the suite with `make test`")
    with ServerProcess("sandbox", {"DAERT_SANDBOX_POOL_SIZE": "2"}) as server:
        server.wait_health("SERVING", timeout_s=60)
        yield server


@pytest.fixture(scope="module")
def corpus(embedding_server: ServerProcess, retrieval_server: ServerProcess) -> None:
    import asyncio

    asyncio.run(load_corpus(embedding_server.target, retrieval_server.target))


@pytest.fixture
def planner_env(
    monkeypatch: pytest.MonkeyPatch,
    generation_server: ServerProcess,
    sandbox_server: ServerProcess,
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
    rerank_server: ServerProcess,
    corpus: None,
) -> None:
    """Where the tasks find the services; no context service, so prompts are trimmed."""
    for name, server in {
        "generation": generation_server,
        "sandbox": sandbox_server,
        "embedding": embedding_server,
        "retrieval": retrieval_server,
        "rerank": rerank_server,
    }.items():
        monkeypatch.setenv(f"DAERT_{name.upper()}_TARGET", server.target)
    monkeypatch.delenv("DAERT_CONTEXT_TARGET", raising=False)


# --- the scripted model ---------------------------------------------------------------------


def task(
    id: str, kind: str, instruction: str, deps: Sequence[str] = (), refs: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "id": id,
        "kind": kind,
        "instruction": instruction,
        "depends_on": list(deps),
        "references": list(refs),
    }


class Script:
    """The fake model's replies: the plans in turn (one per planning request), programs for
    code tasks (a broken one first when `broken_first`), and for llm and answer tasks a
    reply naming their instruction, in `words` tokens (paced by the fake's token delay)."""

    def __init__(self, plans: Sequence[dict[str, Any]], *, words: int = 4) -> None:
        self.plans = list(plans)
        self.words = words
        self.planned = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str) -> list[str]:
        if "You plan work for an objective" in prompt:
            with self.lock:
                plan = self.plans[min(self.planned, len(self.plans) - 1)]
                self.planned += 1
            return [json.dumps(plan)]
        if "Write a Python 3 program" in prompt:
            if "The program failed" in prompt:
                return ["```python\nprint(2000 // 400)\n```"]
            if "BROKEN" in prompt:
                return ["```python\nprint(2000 // 0)\n```"]
            return ["```python\nprint(6 * 7)\n```"]
        answer = "Final answer [manual-0]." if "Compose the final answer" in prompt else "Done:"
        return [answer, *[" ok"] * (self.words - 1)]


def run_plan(
    use_executor: bool = False, during: Callable[[], None] | None = None, **conf: Any
) -> tuple[Any, dict[str, Any]]:
    """One run of the DAG as Airflow parses it from dags/; the run and its report."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS / "plan_tasks.py")).dags["daert_plan"]
    conf = {"model": MODEL, "tenant": ACME, "collection": COLLECTION, **conf}
    worker = threading.Thread(target=during, daemon=True) if during else None
    if worker:
        worker.start()
    run = dag.test(run_conf=conf, use_executor=use_executor)
    if worker:
        worker.join(60)
    report: dict[str, Any] = run.get_task_instance("report").xcom_pull(
        task_ids="report", key="report"
    )
    return run, report


def states(run: Any) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}


def chat_requests(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests_to(CHAT)]


def prompt_of(request: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in request["messages"])


# --- the tests ------------------------------------------------------------------------------

VALID = {
    "tasks": [
        task("find", "search", "Helix-9 coolant pump inspection interval"),
        task("explain", "llm", "Explain the rule in $find", ["find"], ["find"]),
        task(
            "hours",
            "code",
            "BROKEN: count inspections in 2000 hours from $find",
            ["find"],
            ["find"],
        ),
        task("summary", "llm", "Summarise the maintenance passages", ["find"]),
        task("end", "answer", "Answer the objective", ["explain", "hours", "summary"]),
    ]
}
DANGLING = {"tasks": [task("x", "llm", "Think", ["ghost"]), task("end", "answer", "Go", ["x"])]}


def test_a_plan_runs_as_airflow_tasks_independent_ones_at_once_and_the_report_has_it_all(
    fake_llm: FakeOpenAI, airflow_api: AirflowApi
) -> None:
    # The first plan is invalid, the second good; each llm reply takes ~2 s of "decoding".
    fake_llm.reply_fn = Script([DANGLING, VALID], words=5)
    fake_llm.token_delay_s = 0.5
    run, report = run_plan(
        use_executor=True, objective="How often is the Helix-9 pump inspected, in 2000 h?"
    )
    assert run.state == "success", states(run)
    assert report["status"] == "succeeded" and report["not_done"] == []

    # Re-planned once, with the errors sent back to the model.
    [first, second] = report["planning"]["attempts"]
    assert first["errors"] == ["task 'x': depends on 'ghost', which is not in the plan"]
    assert second["errors"] == []
    plans = [r for r in chat_requests(fake_llm) if "You plan work" in prompt_of(r)]
    assert len(plans) == 2 and "depends on 'ghost'" in prompt_of(plans[1])
    assert plans[0]["response_format"]["type"] == "json_schema"

    # Every planned task is its own task instance, labelled with its id, wave by level.
    tis = {(ti.task_id, ti.rendered_map_index): ti.state for ti in run.get_task_instances()}
    for wave, label in [
        ("wave_0", "find (search)"),
        ("wave_1", "explain (llm)"),
        ("wave_1", "hours (code)"),
        ("wave_1", "summary (llm)"),
        ("wave_2", "end (answer)"),
    ]:
        assert tis[(wave, label)] == "success", tis
    assert report["levels"] == [["find"], ["explain", "hours", "summary"], ["end"]]

    by_id = {t["id"]: t for t in report["tasks"]}
    # Independent tasks overlap in time; a task starts only after its dependencies ended.
    start = {t["id"]: _epoch(t["started_at"]) for t in report["tasks"]}
    end = {t["id"]: _epoch(t["ended_at"]) for t in report["tasks"]}
    assert max(start["explain"], start["summary"]) < min(end["explain"], end["summary"])
    for planned in report["tasks"]:
        for dep in planned["depends_on"]:
            assert end[dep] <= start[planned["id"]], (dep, planned["id"])

    # search: hybrid search + rerank; the pump's inspection chunk is the top passage.
    assert by_id["find"]["sources"][0]["chunk_id"] == "manual-0"
    assert "400 operating hours" in by_id["find"]["output"]
    # llm: its dependency's passages are in its prompt, and $find is replaced by them.
    explain = next(r for r in chat_requests(fake_llm) if "Explain the rule in" in prompt_of(r))
    assert prompt_of(explain).count("400 operating hours") == 2
    assert by_id["explain"]["output"] == "Done: ok ok ok ok"
    assert {"task": "find"} in by_id["explain"]["sources"]
    # code: the first program raised; the error went back and the fix ran.
    attempts = by_id["hours"]["details"]["attempts"]
    assert len(attempts) == 2 and "ZeroDivisionError" in attempts[0]["error"]
    assert attempts[1]["error"] == "" and by_id["hours"]["output"] == "5\n"
    # answer: composed last, citing the passage, with the chunk among its sources.
    assert report["answer"] == by_id["end"]["output"] and "[manual-0]" in report["answer"]
    assert "manual-0" in {s.get("chunk_id") for s in by_id["end"]["sources"]}
    # Token usage: planning plus every model call.
    tokens = [t["usage"]["total_tokens"] for t in report["tasks"]]
    planning = report["planning"]["usage"]["total_tokens"]
    assert planning > 0 and by_id["explain"]["usage"]["total_tokens"] > 0
    assert report["usage"]["total_tokens"] == planning + sum(tokens)
    assert all(t["duration_s"] > 0 for t in report["tasks"])


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


CYCLIC = {
    "tasks": [
        task("a", "llm", "A", ["b"]),
        task("b", "llm", "B", ["a"]),
        task("end", "answer", "Go", ["a"]),
    ]
}
UNKNOWN_KIND = {"tasks": [task("x", "browse", "Open a page"), task("end", "answer", "Go", ["x"])]}
TOO_MANY = {
    "tasks": [
        *(task(f"t{i}", "llm", "Think") for i in range(3)),
        task("end", "answer", "Go", ["t0"]),
    ]
}


def test_invalid_plans_are_reported_and_replanned_then_the_run_fails_with_the_last_errors(
    fake_llm: FakeOpenAI,
) -> None:
    fake_llm.reply_fn = Script([CYCLIC, UNKNOWN_KIND, DANGLING, TOO_MANY])
    run, report = run_plan(objective="Anything", max_tasks=3, max_replans=3)
    assert run.state == "failed"
    assert states(run)[("plan", -1)] == "failed"
    assert report["status"] == "planning failed" and report["tasks"] == []
    errors = [a["errors"] for a in report["planning"]["attempts"]]
    assert errors == [
        ["the dependencies form a cycle: a -> b -> a"],
        ["task 'x': unknown kind 'browse' (known: llm, search, code, answer)"],
        ["task 'x': depends on 'ghost', which is not in the plan"],
        ["the plan has 4 tasks; at most 3 are allowed"],
    ]
    assert "no valid plan after 4 attempt(s)" in report["planning"]["error"]
    assert "at most 3 are allowed" in report["planning"]["error"]
    # Each re-plan sent the errors of the one before; nothing else was asked of the model.
    requests = chat_requests(fake_llm)
    assert len(requests) == 4
    for before, request in zip(errors, requests[1:], strict=False):
        assert before[0] in prompt_of(request)
    assert all(state != "success" for (t, _), state in states(run).items() if t.startswith("wave_"))


def test_a_failed_task_fails_only_what_depends_on_it_and_the_report_says_so(
    fake_llm: FakeOpenAI,
) -> None:
    plan = {
        "tasks": [
            task("calc", "code", "BROKEN: compute it"),
            task("note", "llm", "Write a note"),
            task("use", "llm", "Use $calc", ["calc"], ["calc"]),
            task("end", "answer", "Answer", ["note", "use"]),
        ]
    }
    fake_llm.reply_fn = Script([plan])
    run, report = run_plan(objective="Compute", max_code_fixes=0)
    assert run.state == "failed"
    by_id = {t["id"]: t for t in report["tasks"]}
    assert report["done"] == ["note"] and report["not_done"] == ["calc", "use", "end"]
    assert by_id["calc"]["status"] == "failed"
    assert "still failed after 0 fix(es)" in by_id["calc"]["error"]
    assert "ZeroDivisionError" in by_id["calc"]["error"]
    assert by_id["use"]["status"] == by_id["end"]["status"] == "blocked"
    assert "'calc'" in by_id["use"]["error"] and "'use'" in by_id["end"]["error"]
    assert by_id["note"]["output"].startswith("Done:")
    # Neither blocked task asked the model anything.
    asked = [r["messages"][-1]["content"] for r in chat_requests(fake_llm)]
    assert not [text for text in asked if text.startswith(("Use ", "Answer"))], asked


def answer_approval(api_of: AirflowApi, option: str, seen: dict[str, Any]) -> Callable[[], None]:
    """As a person would: once the approval task waits, read its Required Action (what it
    shows goes into `seen`) and answer it with `option` through the HITL REST API."""

    def respond() -> None:
        with api_of.client() as api:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pending = api.get("/api/v2/dags/daert_plan/dagRuns/~/hitlDetails").json()
                # Answered only once the task awaits input: in Airflow 3.3.2's dag.test an
                # answer that comes before is lost, and the run waits for ever.
                waiting = [
                    d
                    for d in pending.get("hitl_details", [])
                    if not d["response_received"]
                    and d["task_instance"]["state"] == "awaiting_input"
                ]
                if waiting:
                    detail = waiting[0]
                    seen.update(
                        subject=detail["subject"], body=detail["body"], options=detail["options"]
                    )
                    ti = detail["task_instance"]
                    answered = api.patch(
                        f"/api/v2/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/"
                        f"{ti['task_id']}/{ti['map_index']}/hitlDetails",
                        json={"chosen_options": [option]},
                    )
                    seen["status"] = answered.status_code
                    return
                time.sleep(0.5)

    return respond


def test_a_rejected_plan_runs_nothing(fake_llm: FakeOpenAI, airflow_api: AirflowApi) -> None:
    fake_llm.reply_fn = Script([VALID])
    seen: dict[str, Any] = {}
    reject = answer_approval(airflow_api, "Reject", seen)
    run, report = run_plan(during=reject, objective="Check the pump", require_approval=True)
    assert seen["status"] == 200, seen
    # The person saw the plan itself.
    assert "| hours | code | find |" in seen["body"]
    assert run.state == "success" and report["status"] == "rejected"
    assert report["approval"]["chosen_options"] == ["Reject"]
    assert report["done"] == [] and all(t["status"] == "not run" for t in report["tasks"])
    ran = {k: v for k, v in states(run).items() if k[0].startswith(("level_", "wave_"))}
    assert set(ran.values()) == {"skipped"}, ran
    assert len(chat_requests(fake_llm)) == 1  # the planning request, nothing after it


def test_an_approved_plan_waits_for_the_person_then_runs_to_success(
    fake_llm: FakeOpenAI, airflow_api: AirflowApi
) -> None:
    plan = {
        "tasks": [
            task("note", "llm", "Write a note on the pump"),
            task("end", "answer", "Answer with $note", ["note"], ["note"]),
        ]
    }
    fake_llm.reply_fn = Script([plan])
    seen: dict[str, Any] = {}
    approve = answer_approval(airflow_api, "Approve", seen)
    run, report = run_plan(during=approve, objective="Note the pump", require_approval=True)
    assert seen["status"] == 200, seen
    # What the person was shown: the objective in the subject, the plan's table in the body.
    assert seen["subject"] == "Run this plan for: Note the pump?"
    assert "**Objective:** Note the pump" in seen["body"]
    assert "| note | llm | - | Write a note on the pump |" in seen["body"]
    assert "| end | answer | note | Answer with $note |" in seen["body"]
    assert seen["options"] == ["Approve", "Reject"]
    # Nothing ran before the answer; after it, the whole plan did.
    assert run.state == "success", states(run)
    assert report["status"] == "succeeded" and report["not_done"] == []
    assert report["done"] == ["note", "end"]
    assert report["approval"]["chosen_options"] == ["Approve"]
    assert "admin" in str(report["approval"]["responded_by"])  # who answered, through the API
    assert states(run)[("approve", -1)] == "success"
    responded = _epoch(report["approval"]["responded_at"])
    assert all(_epoch(t["started_at"]) >= responded for t in report["tasks"]), report["tasks"]
    assert report["answer"] == "Final answer [manual-0]. ok ok ok"
    asked = [prompt_of(r) for r in chat_requests(fake_llm)]
    assert len(asked) == 3 and "Write a note on the pump" in asked[1]
