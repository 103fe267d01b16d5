"""A plan: the tasks the model wrote, its JSON schema (the structured-output constraint), its
validation, and its topological levels (the waves the DAG runs).

A task is ``{"id", "kind", "instruction", "depends_on": [ids], "references": [ids]}``. An
instruction may cite an earlier result as ``$<id>`` (LLMCompiler's ``$1``); every id it
cites must be in `references`, and every reference must be a dependency, so a result is
always there before the task that reads it starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("llm", "search", "code", "answer")
# Ids show in the Airflow UI (each mapped task's label) and in `$id` markers.
ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MARKER = re.compile(r"\$([a-z][a-z0-9_]{0,31})")


@dataclass(frozen=True)
class PlannedTask:
    id: str
    kind: str
    instruction: str
    depends_on: tuple[str, ...] = ()
    references: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "depends_on": list(self.depends_on),
            "references": list(self.references),
        }


def plan_schema(max_tasks: int) -> dict[str, Any]:
    """The JSON schema the generation service constrains the plan to."""
    ids = {"type": "array", "items": {"type": "string"}}
    task = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN.pattern},
            "kind": {"type": "string", "enum": list(KINDS)},
            "instruction": {"type": "string", "minLength": 1},
            "depends_on": ids,
            "references": ids,
        },
        "required": ["id", "kind", "instruction", "depends_on", "references"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "tasks": {"type": "array", "items": task, "minItems": 1, "maxItems": max_tasks}
        },
        "required": ["tasks"],
        "additionalProperties": False,
    }


def parse(text: str) -> tuple[list[PlannedTask], list[str]]:
    """The tasks in the model's reply, and what kept any of them from being read. A server
    without schema enforcement can send anything, so nothing is assumed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [f"the plan is not JSON: {exc}"]
    raw = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return [], ['the plan must be a JSON object with a "tasks" array']
    tasks, errors = [], []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            errors.append(f"tasks[{i}]: must be an object")
            continue
        fields = {k: item.get(k) for k in ("id", "kind", "instruction")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        lists = {k: item.get(k, []) for k in ("depends_on", "references")}
        bad += [k for k, v in lists.items() if not _string_list(v)]
        if bad:
            errors.append(f"tasks[{i}]: {', '.join(bad)} missing or of the wrong type")
            continue
        tasks.append(
            PlannedTask(
                id=texts["id"],
                kind=texts["kind"],
                instruction=texts["instruction"],
                depends_on=tuple(lists["depends_on"]),
                references=tuple(lists["references"]),
            )
        )
    return tasks, errors


def _string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate(
    tasks: Sequence[PlannedTask], *, max_tasks: int, allow_code: bool, has_collection: bool
) -> list[str]:
    """Every problem with the plan, each a sentence naming the task at fault (empty: valid)."""
    errors: list[str] = []
    if not tasks:
        errors.append("the plan has no tasks")
    if len(tasks) > max_tasks:
        errors.append(f"the plan has {len(tasks)} tasks; at most {max_tasks} are allowed")
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            errors.append(f"task id {task.id!r} is used more than once")
        seen.add(task.id)
        if not ID_PATTERN.match(task.id):
            errors.append(f"task id {task.id!r} must match {ID_PATTERN.pattern}")
    ids = {t.id for t in tasks}
    for task in tasks:
        where = f"task {task.id!r}"
        if task.kind not in KINDS:
            errors.append(f"{where}: unknown kind {task.kind!r} (known: {', '.join(KINDS)})")
        elif task.kind == "code" and not allow_code:
            errors.append(f"{where}: code tasks are not allowed in this run")
        elif task.kind == "search" and not has_collection:
            errors.append(f"{where}: search tasks need the run's collection param, which is empty")
        if not task.instruction.strip():
            errors.append(f"{where}: the instruction is empty")
        for dep in task.depends_on:
            if dep == task.id:
                errors.append(f"{where}: depends on itself")
            elif dep not in ids:
                errors.append(f"{where}: depends on {dep!r}, which is not in the plan")
        for ref in task.references:
            if ref not in task.depends_on:
                errors.append(f"{where}: references {ref!r}, which is not one of its dependencies")
        for cited in MARKER.findall(task.instruction):
            if cited not in task.references:
                errors.append(f"{where}: the instruction cites ${cited} but references omits it")
    cycle = find_cycle(tasks)
    if cycle:
        errors.append(f"the dependencies form a cycle: {' -> '.join(cycle)}")
    answers = [t.id for t in tasks if t.kind == "answer"]
    if len(answers) != 1:
        errors.append(f"the plan needs exactly one answer task, the last; it has {len(answers)}")
    elif any(answers[0] in t.depends_on for t in tasks):
        errors.append(f"task {answers[0]!r}: the answer task must be last; others depend on it")
    return errors


def find_cycle(tasks: Sequence[PlannedTask]) -> list[str]:
    """One dependency cycle as a path that ends where it starts (empty: none). Dependencies
    on unknown ids are ignored here (validate reports them)."""
    deps = {t.id: [d for d in t.depends_on if d != t.id] for t in tasks}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, ()):
            if dep not in deps:
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for task in tasks:
        if task.id not in state:
            found = visit(task.id)
            if found:
                return found
    return []


def levels(tasks: Sequence[PlannedTask]) -> list[list[str]]:
    """The tasks by topological level: level 0 depends on nothing, level n on at least one
    task of level n-1 and nothing later. Tasks of one level never depend on each other, so
    each level can run at once. Within a level the plan's order is kept. Needs a valid plan."""
    by_id = {t.id: t for t in tasks}
    depth: dict[str, int] = {}

    def level_of(task_id: str) -> int:
        if task_id not in depth:
            deps = by_id[task_id].depends_on
            depth[task_id] = 1 + max((level_of(d) for d in deps), default=-1)
        return depth[task_id]

    out: list[list[str]] = []
    for task in tasks:
        n = level_of(task.id)
        out.extend([] for _ in range(n + 1 - len(out)))
        out[n].append(task.id)
    return out


def from_dicts(items: Sequence[Mapping[str, Any]]) -> list[PlannedTask]:
    """Tasks back from their XCom form (PlannedTask.to_dict)."""
    return [
        PlannedTask(
            id=i["id"],
            kind=i["kind"],
            instruction=i["instruction"],
            depends_on=tuple(i["depends_on"]),
            references=tuple(i["references"]),
        )
        for i in items
    ]


def markdown(objective: str, tasks: Sequence[PlannedTask]) -> str:
    """The plan as a person reads it (the approval form shows this)."""
    lines = [f"**Objective:** {objective}", "", "| id | kind | depends on | instruction |"]
    lines.append("|---|---|---|---|")
    for t in tasks:
        instruction = " ".join(t.instruction.split()).replace("|", "\\|")
        lines.append(f"| {t.id} | {t.kind} | {', '.join(t.depends_on) or '-'} | {instruction} |")
    return "\n".join(lines)
