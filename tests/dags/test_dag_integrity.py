"""Every file in dags/ loads in Airflow's DagBag without an error, and every DAG's graph and
trigger form are sound (the ask-astro DAG-integrity test)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.dags.conftest import DAGS, dag_files


@pytest.fixture(scope="module")
def dag_bag(airflow_db: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(dag_bag: Any) -> None:
    assert dag_files(), "dags/ holds no DAG file"
    assert dag_bag.import_errors == {}
    loaded = {dag.fileloc for dag in dag_bag.dags.values()}
    assert loaded == {str(path) for path in dag_files()}, "a file in dags/ defines no DAG"


def test_the_ingestion_dag_is_there_with_its_tasks(dag_bag: Any) -> None:
    dag = dag_bag.dags["daert_ingest"]
    assert set(dag.task_ids) == {"prepare", "ingest_batch", "summarize"}
    # The batches follow the plan; the summary waits for every batch.
    assert dag.get_task("ingest_batch").upstream_task_ids == {"prepare"}
    assert dag.get_task("summarize").upstream_task_ids == {"ingest_batch"}
    assert dag.get_task("ingest_batch").retries >= 1


def test_no_dag_has_a_cycle(dag_bag: Any) -> None:
    for dag in dag_bag.dags.values():
        # topological_sort raises on a cycle.
        assert len(dag.topological_sort()) == len(dag.tasks), dag.dag_id


def test_every_param_has_a_valid_schema_and_a_description(dag_bag: Any) -> None:
    for dag in dag_bag.dags.values():
        for name, param in dag.params.items():
            schema = param.schema
            jsonschema.Draft202012Validator.check_schema(schema)
            assert param.description, f"{dag.dag_id}.{name} has no description"
            if param.has_value:  # the default passes the form's own validation
                assert param.resolve() == param.value, f"{dag.dag_id}.{name}"


def test_the_ingestion_form_rejects_a_bad_value(dag_bag: Any) -> None:
    mode = dag_bag.dags["daert_ingest"].params.get_param("mode")
    assert mode.resolve("sync") == "sync"
    with pytest.raises(ValueError, match="everything"):
        mode.resolve("everything")


def test_the_ingestion_form_takes_every_kind_of_value(dag_bag: Any) -> None:
    params = dag_bag.dags["daert_ingest"].params
    conf = {
        "source": ["/data/docs", "https://example.com/a.html"],
        "collection": "handbook",
        "metadata": {"team": "docs", "tags": ["hr", 2026], "reviewed": True},
        "chunk_tokens": 128,
    }
    for name, value in conf.items():
        assert params.get_param(name).resolve(value) == value, name
