"""Plan parsing, validation (each rule names the task at fault), cycles, topological levels
and the wave slots the DAG maps over; the sandbox failure and program extraction rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from daert.planner import waves
from daert.planner.calls import estimate_tokens, system, trim_by_estimate, user
from daert.planner.errors import PlannerError
from daert.planner.execute import failure_of, program_of
from daert.planner.params import PlannerParams, parse_params
from daert.planner.plan import PlannedTask, find_cycle, levels, parse, plan_schema, validate
from daert.v1 import sandbox_pb2


def t(
    id: str,
    kind: str = "llm",
    deps: tuple[str, ...] = (),
    refs: tuple[str, ...] = (),
    text: str = "do it",
) -> PlannedTask:
    return PlannedTask(id=id, kind=kind, instruction=text, depends_on=deps, references=refs)


def check(tasks: list[PlannedTask], **kw: Any) -> list[str]:
    options = {"max_tasks": 6, "allow_code": True, "has_collection": True, **kw}
    return validate(tasks, **options)


FAN = [
    t("root", "search"),
    t("a", deps=("root",)),
    t("b", "code", deps=("root",)),
    t("end", "answer", deps=("a", "b")),
]


def test_a_sound_plan_has_no_errors_and_runs_in_levels() -> None:
    assert check(FAN) == []
    assert levels(FAN) == [["root"], ["a", "b"], ["end"]]


def test_levels_follow_the_longest_path_and_keep_the_plan_order() -> None:
    tasks = [
        t("x"), t("y"), t("z", deps=("x",)), t("w", deps=("z", "y")), t("v", deps=("y",)),
        t("end", "answer", deps=("w", "v")),
    ]  # fmt: skip
    assert levels(tasks) == [["x", "y"], ["z", "v"], ["w"], ["end"]]
    # No task shares a level with anything it depends on, and every dependency is earlier.
    at = {i: n for n, level in enumerate(levels(tasks)) for i in level}
    assert all(at[d] < at[task.id] for task in tasks for d in task.depends_on)


def test_each_rule_is_reported_naming_the_task() -> None:
    assert check([*FAN[:3], t("a", "answer", deps=("root",))]) == [
        "task id 'a' is used more than once"
    ]
    assert check([t("x", "browse"), t("end", "answer", deps=("x",))]) == [
        "task 'x': unknown kind 'browse' (known: llm, search, code, answer)"
    ]
    assert check([t("x", deps=("ghost",)), t("end", "answer", deps=("x",))]) == [
        "task 'x': depends on 'ghost', which is not in the plan"
    ]
    assert check([t("x", refs=("y",)), t("y"), t("end", "answer", deps=("x", "y"))]) == [
        "task 'x': references 'y', which is not one of its dependencies"
    ]
    assert check([t("x"), t("end", "answer", deps=("x",), text="use $x")]) == [
        "task 'end': the instruction cites $x but references omits it"
    ]
    assert check(FAN, max_tasks=3) == ["the plan has 4 tasks; at most 3 are allowed"]
    assert check(FAN, allow_code=False) == ["task 'b': code tasks are not allowed in this run"]
    assert check(FAN, has_collection=False) == [
        "task 'root': search tasks need the run's collection param, which is empty"
    ]
    assert check([t("Bad Id"), t("end", "answer", deps=("Bad Id",))]) == [
        "task id 'Bad Id' must match ^[a-z][a-z0-9_]{0,31}$"
    ]
    assert check([t("x")]) == ["the plan needs exactly one answer task, the last; it has 0"]
    assert check([t("end", "answer"), t("x", deps=("end",)), t("y", "answer", deps=("x",))])[0] == (
        "the plan needs exactly one answer task, the last; it has 2"
    )
    assert check([t("end", "answer"), t("x", deps=("end",))]) == [
        "task 'end': the answer task must be last; others depend on it"
    ]
    assert check([]) == [
        "the plan has no tasks",
        "the plan needs exactly one answer task, the last; it has 0",
    ]


def test_a_cycle_is_shown_as_a_path() -> None:
    tasks = [
        t("a", deps=("c",)),
        t("b", deps=("a",)),
        t("c", deps=("b",)),
        t("end", "answer", deps=("c",)),
    ]
    assert find_cycle(tasks) == ["a", "c", "b", "a"]
    assert check(tasks) == ["the dependencies form a cycle: a -> c -> b -> a"]
    assert check([t("a", deps=("a",)), t("end", "answer", deps=("a",))]) == [
        "task 'a': depends on itself"
    ]
    assert find_cycle(FAN) == []


def test_the_reply_is_read_defensively() -> None:
    assert parse("not json")[1][0].startswith("the plan is not JSON")
    assert parse('{"steps": []}') == ([], ['the plan must be a JSON object with a "tasks" array'])
    tasks, errors = parse(json.dumps({"tasks": [{"id": "x", "kind": "llm"}, 3]}))
    assert tasks == [] and errors == [
        "tasks[0]: instruction missing or of the wrong type",
        "tasks[1]: must be an object",
    ]
    good = {"id": "x", "kind": "llm", "instruction": "hi", "depends_on": [], "references": []}
    assert parse(json.dumps({"tasks": [good]})) == ([t("x", text="hi")], [])


def test_the_schema_bounds_the_tasks_and_their_kinds() -> None:
    schema = plan_schema(4)
    assert schema["properties"]["tasks"]["maxItems"] == 4
    assert schema["properties"]["tasks"]["items"]["properties"]["kind"]["enum"] == [
        "llm", "search", "code", "answer"
    ]  # fmt: skip


def test_waves_map_each_task_with_where_its_dependencies_ran() -> None:
    plan = {"tasks": [x.to_dict() for x in FAN], "levels": levels(FAN)}
    assert waves.slots(plan) == {"root": (0, 0), "a": (1, 0), "b": (1, 1), "end": (2, 0)}
    [end] = waves.schedule(plan, 2)
    assert end["inputs"] == {"a": [1, 0], "b": [1, 1]} and end["kind"] == "answer"
    assert waves.schedule(plan, 3) == []
    assert waves.label(end) == "end (answer)"


def test_params_are_checked_naming_the_field() -> None:
    assert parse_params({"objective": "x"}) == PlannerParams(objective="x")
    with pytest.raises(PlannerError, match="max_tasks: Input should be less than or equal to 10"):
        parse_params({"objective": "x", "max_tasks": 11})


def test_dependency_results_are_trimmed_to_the_budget_the_instruction_kept() -> None:
    messages = [system("s" * 30), user("a" * 3000), user("b" * 300), user("the task")]
    fitted = trim_by_estimate(messages, 200)
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert sum(estimate_tokens(m.content) for m in fitted) <= 200
    assert fitted[1].content.endswith("…[cut to fit the model's context]")
    assert trim_by_estimate(messages, 10_000) == messages


def test_programs_are_taken_from_their_fence_and_failures_explained() -> None:
    assert program_of("Here:\n```python\nprint(1)\n```\nDone.") == "print(1)\n"
    assert program_of("print(2)") == "print(2)\n"
    failed = sandbox_pb2.ExecuteResponse(
        exit_code=1,
        error=sandbox_pb2.ExecutionError(type_name="ZeroDivisionError", message="division by zero"),
    )
    assert failure_of(failed) == "ZeroDivisionError: division by zero"
    assert failure_of(sandbox_pb2.ExecuteResponse(timed_out=True)).startswith("it ran out of time")
    assert failure_of(sandbox_pb2.ExecuteResponse(stdout="ok")) == ""
