"""The run's report: the objective, the plan (and how planning went), the approval, each
task's outcome with its output, sources, timings and token usage, what was done and what
not, and the final answer. `render` is the same as text for the report task's log."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from daert.planner.calls import Usage

Outcome = Mapping[str, Any]


def _when(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds") if epoch else None


def _never_ran(planned: Mapping[str, Any], status_of: Mapping[str, str]) -> dict[str, Any]:
    """A task whose task instance never ran: Airflow marked its wave upstream_failed, the
    whole level before it having failed."""
    missing = [d for d in planned["depends_on"] if status_of.get(d) != "done"]
    if not missing:
        return {"status": "not run"}
    error = f"task {planned['id']!r} not run: its dependencies {missing} have no result"
    return {"status": "blocked", "error": error}


def build(
    objective: str,
    plan: Mapping[str, Any] | None,
    planning_failure: Mapping[str, Any] | None,
    approval: Mapping[str, Any] | None,
    outcomes: Mapping[str, Outcome | None],
) -> dict[str, Any]:
    """`outcomes` by planned task id: its result (status "done"), its failure record
    (status "failed" / "blocked"), or None when it never ran."""
    planning_usage = Usage()
    if plan is not None:
        planning_usage.add(plan["usage"])
    elif planning_failure is not None:
        planning_usage.add(planning_failure["usage"])
    usage = Usage()
    usage.add(planning_usage)
    rejected = approval is not None and approval.get("chosen_options") == ["Reject"]
    status_of: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    planned_by_id = {t["id"]: t for t in plan["tasks"]} if plan else {}
    # In level order, so a dependency's status is known before its dependents'.
    for task_id in (i for level in plan["levels"] for i in level) if plan else ():
        planned = planned_by_id[task_id]
        outcome = outcomes.get(task_id) or (
            {"status": "not run"} if rejected else _never_ran(planned, status_of)
        )
        status_of[task_id] = outcome["status"]
        if outcome.get("usage"):
            usage.add(outcome["usage"])
        entries[task_id] = {
            **planned,
            "status": outcome["status"],
            "output": outcome.get("output"),
            "sources": outcome.get("sources", []),
            "error": outcome.get("error"),
            "usage": outcome.get("usage"),
            "started_at": _when(outcome.get("started")),
            "ended_at": _when(outcome.get("ended")),
            "duration_s": outcome.get("duration_s"),
            "details": outcome.get("details"),
        }
    tasks = [entries[t["id"]] for t in plan["tasks"]] if plan else []
    done = [t["id"] for t in tasks if t["status"] == "done"]
    if plan is None:
        status = "planning failed"
    elif rejected:
        status = "rejected"
    else:
        status = "succeeded" if len(done) == len(tasks) else "failed"
    starts = [o["started"] for o in outcomes.values() if o and o.get("started")]
    ends = [o["ended"] for o in outcomes.values() if o and o.get("ended")]
    answer = next(
        (t["output"] for t in tasks if t["kind"] == "answer" and t["status"] == "done"), None
    )
    return {
        "objective": objective,
        "status": status,
        "answer": answer,
        "plan": plan["tasks"] if plan else None,
        "levels": plan["levels"] if plan else None,
        "planning": {
            "attempts": (plan or planning_failure or {}).get("attempts", []),
            "seconds": (plan or {}).get("planning_s"),
            "error": (planning_failure or {}).get("error"),
            "usage": planning_usage.to_dict(),
        },
        "approval": {
            "chosen_options": approval.get("chosen_options"),
            "responded_by": approval.get("responded_by_user"),
            "responded_at": str(approval.get("responded_at")),
        }
        if approval
        else None,
        "tasks": tasks,
        "done": done,
        "not_done": [t["id"] for t in tasks if t["status"] != "done"],
        "timings": {
            "planning_s": (plan or {}).get("planning_s"),
            "tasks_s": round(max(ends) - min(starts), 3) if starts and ends else None,
        },
        "usage": usage.to_dict(),
    }


def render(report: Mapping[str, Any]) -> str:
    """The report as text (the report task logs it)."""
    lines = [
        f"Objective: {report['objective']}",
        f"Status: {report['status']}",
        f"Token usage: {json.dumps(report['usage'])}",
        f"Timings: {json.dumps(report['timings'])}",
    ]
    planning = report["planning"]
    for attempt in planning["attempts"]:
        errors = attempt["errors"]
        verdict = "valid" if not errors else "invalid: " + "; ".join(errors)
        lines.append(f"Plan attempt {attempt['attempt']}: {verdict}")
    if planning["error"]:
        lines.append(f"Planning failed: {planning['error']}")
    if report["approval"]:
        approval = report["approval"]
        lines.append(
            f"Approval: {approval.get('chosen_options')} by {approval.get('responded_by')}"
        )
    for task in report["tasks"]:
        lines.append("")
        head = f"[{task['status']}] {task['id']} ({task['kind']})"
        if task["depends_on"]:
            head += f" after {', '.join(task['depends_on'])}"
        if task["duration_s"] is not None:
            head += f", {task['duration_s']} s from {task['started_at']}"
        lines.append(head)
        lines.append(f"  instruction: {task['instruction']}")
        if task["error"]:
            lines.append(f"  error: {task['error']}")
        if task["output"] is not None:
            lines.extend("  | " + line for line in str(task["output"]).splitlines() or [""])
        chunks = [s["chunk_id"] for s in task["sources"] if "chunk_id" in s]
        if chunks:
            lines.append(f"  sources: {', '.join(chunks)}")
    _section(lines, "Done", report["done"])
    _section(lines, "Not done", report["not_done"])
    if report["answer"] is not None:
        lines += ["", "Answer:", str(report["answer"])]
    return "\n".join(lines)


def _section(lines: list[str], title: str, ids: Sequence[str]) -> None:
    lines.append(f"{title}: {', '.join(ids) if ids else '-'}")
