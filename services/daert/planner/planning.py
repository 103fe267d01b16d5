"""Planning: the objective -> a validated plan, from the generation service with the plan's
JSON schema as structured output (servers that cannot constrain answer FAILED_PRECONDITION,
which fails the task). An invalid plan goes back to the model with its errors, at most
`max_replans` times; then InvalidPlan carries every attempt's errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from daert.clients import GenerationClient
from daert.planner import plan as plans
from daert.planner.calls import Usage, assistant, generate, system, user
from daert.planner.errors import InvalidPlan
from daert.planner.params import PlannerParams, parse_params
from daert.v1 import generation_pb2

PLAN_MAX_TOKENS = 2048

SYSTEM_PROMPT = """You plan work for an objective as a list of tasks that run as a graph.
Kinds of task:
- "search": searches the document collection; its instruction is the search query.
- "llm": the model answers its instruction, given the results of the tasks it depends on.
- "code": the model writes a Python program for its instruction and a sandbox runs it; use it
  for arithmetic and data work. It prints its result.
- "answer": composes the final answer to the objective from the results it depends on.
Rules: ids are short snake_case names, unique. "depends_on" lists the tasks whose results a
task needs; tasks that do not depend on each other run at the same time, so only add real
dependencies. An instruction may cite an earlier result as $id; every id cited must be in the
task's "references", and every reference must be in its "depends_on". Exactly one task is of
kind "answer"; it is the last, and no task depends on it.
Reply with JSON only: {"tasks": [{"id", "kind", "instruction", "depends_on", "references"}]}."""


def _request(params: PlannerParams) -> str:
    kinds = [k for k in plans.KINDS if (k != "code" or params.allow_code)]
    if not params.collection:
        kinds.remove("search")
    return (
        f"Objective: {params.objective}\n"
        f"Use at most {params.max_tasks} tasks, of the kinds: {', '.join(kinds)}."
    )


def _replan(errors: list[str]) -> str:
    listed = "\n".join(f"- {e}" for e in errors)
    return f"That plan is invalid:\n{listed}\nWrite the whole plan again, corrected."


def response_format(max_tasks: int) -> generation_pb2.ResponseFormat:
    schema = struct_pb2.Struct()
    schema.update(plans.plan_schema(max_tasks))
    return generation_pb2.ResponseFormat(
        type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema_struct=schema,
        schema_name="plan",
    )


async def _make(params: PlannerParams) -> dict[str, Any]:
    messages = [system(SYSTEM_PROMPT), user(_request(params))]
    attempts: list[dict[str, Any]] = []
    usage = Usage()
    started = time.monotonic()
    async with GenerationClient() as client:
        for attempt in range(1, params.max_replans + 2):
            reply = await generate(
                client,
                f"planning (attempt {attempt})",
                messages,
                model=params.model,
                tenant=params.tenant,
                max_tokens=PLAN_MAX_TOKENS,
                response_format=response_format(params.max_tasks),
            )
            usage.add(reply.usage)
            tasks, errors = plans.parse(reply.text)
            if not errors:
                errors = plans.validate(
                    tasks,
                    max_tasks=params.max_tasks,
                    allow_code=params.allow_code,
                    has_collection=bool(params.collection),
                )
            attempts.append({"attempt": attempt, "reply": reply.text, "errors": errors})
            if not errors:
                break
            messages += [assistant(reply.text), user(_replan(errors))]
        else:
            raise InvalidPlan(attempts, usage.to_dict())
    waves = plans.levels(tasks)
    return {
        "objective": params.objective,
        "tasks": [t.to_dict() for t in tasks],
        "levels": waves,
        "attempts": attempts,
        "usage": usage.to_dict(),
        "model": reply.model,
        "planning_s": round(time.monotonic() - started, 3),
        "markdown": plans.markdown(params.objective, tasks),
    }


def make_plan(params: PlannerParams | Mapping[str, Any]) -> dict[str, Any]:
    """The run's plan: ``{"objective", "tasks": [task dicts], "levels": [[ids]],
    "attempts": [{"attempt", "reply", "errors"}], "usage", "model", "planning_s",
    "markdown"}``. Raises InvalidPlan, PlannerError or ServiceUnavailable."""
    return asyncio.run(_make(parse_params(params)))
