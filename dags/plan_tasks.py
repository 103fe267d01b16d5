"""
### daert_plan: an objective → a plan of dependent tasks → each task run as its own Airflow task

`plan` asks the generation service for a plan (structured output: tasks with id, kind,
instruction, depends_on and references), validates it and sends an invalid one back with its
errors, at most `max_replans` times. With `require_approval`, `approve` waits for a person
(Required Actions in the UI) with the plan shown; a rejection runs nothing.

Level *n* of the plan runs as `wave_<n>`: one mapped task instance per planned task, labelled
with its id and kind, all of a level at the same time; `level_<n>` picks the tasks of level *n*
(the DAG's shape is fixed when it is parsed; levels past the plan's last are skipped). A
task whose dependency failed fails without running; the others go on.

`report` writes the report (objective, plan, each task's output, sources, timings and token
usage, what was done and what not) to its log and to its XCom `report`, and fails the run
when something was not done. See docs/planner.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.exceptions import AirflowFailException, AirflowSkipException
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, dag, get_current_context, task
from daert.planner import waves
from daert.planner.params import MAX_TASKS, param_specs

# The tasks import daert.planner.planning / execute (gRPC, the clients) when they run: the
# dag-processor imports this file every 30 s, and its top level should stay light.

# A service that is down or overloaded fails a task; Airflow retries it with backoff. Errors
# a retry cannot fix raise AirflowFailException, which is never retried.
_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay": timedelta(seconds=5),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=1),
    "execution_timeout": timedelta(minutes=15),
}


class _ApprovePlan(ApprovalOperator):
    """Airflow's human-in-the-loop approval, asked only when the run's params want it."""

    def execute(self, context: Any) -> Any:
        if not context["params"]["require_approval"]:
            self.log.info("require_approval is off: the plan runs without one")
            return None
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # Pushed first: a rejection skips level_0 by raising, so no return value is pushed.
        if "error" not in event:
            decision = {
                "chosen_options": event["chosen_options"],
                "responded_by_user": event["responded_by_user"],
                "responded_at": str(event["responded_at"]),
            }
            context["ti"].xcom_push(key="decision", value=decision)
        return super().execute_complete(context, event)


@dag(
    dag_id="daert_plan",
    description="An objective planned by the model into dependent tasks, run in parallel waves",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={name: Param(**spec) for name, spec in param_specs().items()},
    tags=["daert", "planner"],
    default_args=_RETRIES,
)
def daert_plan() -> None:
    @task
    def plan() -> dict[str, Any]:
        """The validated plan (also the approval form's body)."""
        from daert.planner import planning
        from daert.planner.errors import InvalidPlan, PlannerError, ServiceUnavailable

        context = get_current_context()
        try:
            return planning.make_plan(context["params"])
        except InvalidPlan as exc:
            failure = {"error": str(exc), "attempts": exc.attempts, "usage": exc.usage}
            context["ti"].xcom_push(key="failure", value=failure)
            raise AirflowFailException(str(exc)) from exc
        except ServiceUnavailable:
            raise
        except PlannerError as exc:
            context["ti"].xcom_push(key="failure", value={"error": str(exc), "usage": {}})
            raise AirflowFailException(str(exc)) from exc

    approve = _ApprovePlan(
        task_id="approve",
        subject="Run this plan for: {{ params.objective }}?",
        body="{{ ti.xcom_pull(task_ids='plan')['markdown'] }}",
        defaults="Reject",  # what an unanswered request becomes after response_timeout
        response_timeout=timedelta(hours=24),
        retries=0,
    )

    @task
    def level(number: int) -> list[dict[str, Any]]:
        tasks = waves.schedule(get_current_context()["ti"].xcom_pull(task_ids="plan"), number)
        if not tasks:
            raise AirflowSkipException(f"the plan has no level {number}")
        return tasks

    @task(map_index_template="{{ planned_task }}")
    def run_planned(planned: dict[str, Any]) -> dict[str, Any]:
        from daert.planner import execute
        from daert.planner.errors import PlannerError, ServiceUnavailable

        context = get_current_context()
        context["planned_task"] = waves.label(planned)  # type: ignore[typeddict-unknown-key]
        ti = context["ti"]
        dependencies = {
            dep: ti.xcom_pull(task_ids=waves.wave_task_id(lvl), map_indexes=index)
            for dep, (lvl, index) in planned["inputs"].items()
        }
        try:
            return execute.run(context["params"], planned, dependencies)
        except PlannerError as exc:
            status = "blocked" if isinstance(exc, execute.Blocked) else "failed"
            failure = {"id": planned["id"], "kind": planned["kind"], "status": status}
            ti.xcom_push(key="failure", value={**failure, "error": str(exc)})
            if isinstance(exc, ServiceUnavailable):
                raise
            raise AirflowFailException(str(exc)) from exc

    @task(trigger_rule="all_done", retries=0)
    def report() -> None:
        from daert.planner import report as reports

        context = get_current_context()
        ti = context["ti"]
        made = ti.xcom_pull(task_ids="plan")
        outcomes = {}
        for task_id, (lvl, index) in (waves.slots(made) if made else {}).items():
            wave = waves.wave_task_id(lvl)
            outcomes[task_id] = ti.xcom_pull(task_ids=wave, map_indexes=index) or ti.xcom_pull(
                task_ids=wave, key="failure", map_indexes=index
            )
        written = reports.build(
            context["params"]["objective"],
            made,
            ti.xcom_pull(task_ids="plan", key="failure"),
            ti.xcom_pull(task_ids="approve", key="decision"),
            outcomes,
        )
        ti.xcom_push(key="report", value=written)
        print(reports.render(written))
        if written["status"] in ("failed", "planning failed"):
            raise AirflowFailException(f"{written['status']}: not done: {written['not_done']}")

    previous = plan() >> approve
    for number in range(MAX_TASKS):
        # After the first level: run when the previous wave is over with at least one task
        # done (the rest fail on their own), skip once the plan has no more levels.
        rule = "all_success" if number == 0 else "all_done_min_one_success"
        chosen = level.override(task_id=f"level_{number}", trigger_rule=rule)(number)
        previous >> chosen
        previous = run_planned.override(task_id=waves.wave_task_id(number)).expand(planned=chosen)
    previous >> report()


daert_plan()
