"""Planned task lists as Airflow work: an objective -> a plan of dependent tasks written by
the model (structured output), validated and re-planned -> each task carried out by the
model, retrieval or the sandbox -> a report. The DAG (dags/plan_tasks.py) only wires these
modules; docs/planner.md tells the design."""
