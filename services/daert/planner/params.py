"""The parameters of one planner run (the DAG's trigger form), validated with pydantic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daert.planner.errors import PlannerError

# The DAG has one wave of mapped tasks per topological level, fixed when it is parsed; a
# plan of this many tasks in a chain needs them all.
MAX_TASKS = 10


class PlannerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: str = Field(min_length=1, description="What the plan must achieve, in plain words.")
    tenant: str = Field(
        "", description="Tenant of the search tasks' collection; empty is the default."
    )
    collection: str = Field(
        "",
        description="Retrieval collection the search tasks search; empty allows no search tasks.",
    )
    model: str = Field(
        "",
        description="Generation model for planning and every task; empty is the service's default.",
    )
    tokenizer: str = Field(
        "",
        description="Tokenizer the context service counts prompts with (a name it serves, "
        "e.g. the model's); empty is its default. Unused without the context service.",
    )
    max_tasks: int = Field(6, ge=1, le=MAX_TASKS, description="Most tasks a plan may have.")
    allow_code: bool = Field(
        True, description="Whether the plan may have code tasks (run in the sandbox)."
    )
    require_approval: bool = Field(
        False,
        description="Whether a person must approve the plan (Required Actions) before it runs.",
    )
    max_replans: int = Field(
        2,
        ge=0,
        le=5,
        description="How often an invalid plan goes back to the model with its errors.",
    )
    max_code_fixes: int = Field(
        2, ge=0, le=5, description="How often a failing program goes back to the model to be fixed."
    )


def parse_params(raw: PlannerParams | Mapping[str, Any]) -> PlannerParams:
    """`raw` validated, or PlannerError naming every offending field."""
    if isinstance(raw, PlannerParams):
        return raw
    try:
        return PlannerParams.model_validate(dict(raw))
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors()]
        raise PlannerError("invalid planner params:\n  " + "\n  ".join(problems)) from None


def param_specs() -> dict[str, dict[str, Any]]:
    """JSON-schema keywords per field for the DAG's trigger form (``Param(**spec)``); a
    required field has no "default"."""
    schema = PlannerParams.model_json_schema()
    return {name: dict(prop) for name, prop in schema["properties"].items()}
