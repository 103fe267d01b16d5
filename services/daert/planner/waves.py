"""Where each planned task runs in the DAG: level n of the plan is the mapped task
`wave_<n>`, one task instance per planned task, in the level's order. A task reads its
dependencies' results from the XCom of their (wave, map index)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def wave_task_id(level: int) -> str:
    return f"wave_{level}"


def slots(plan: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """{planned task id: (level, map index)}."""
    return {
        task_id: (level, index)
        for level, ids in enumerate(plan["levels"])
        for index, task_id in enumerate(ids)
    }


def schedule(plan: Mapping[str, Any], level: int) -> list[dict[str, Any]]:
    """The tasks of `level` to map over (empty past the last level), each with
    ``"inputs": {dependency id: [level, map index]}``."""
    if level >= len(plan["levels"]):
        return []
    where = slots(plan)
    by_id = {t["id"]: t for t in plan["tasks"]}
    return [
        {**by_id[task_id], "inputs": {d: list(where[d]) for d in by_id[task_id]["depends_on"]}}
        for task_id in plan["levels"][level]
    ]


def label(task: Mapping[str, Any]) -> str:
    """How the task instance is labelled in the UI (its map_index_template)."""
    return f"{task['id']} ({task['kind']})"
