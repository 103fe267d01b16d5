"""Airflow for the DAG tests: configured in this process (its metadata in a database of its
own on the session's real PostgreSQL, migrated by `airflow db migrate`) before the first
`import airflow`, which reads its configuration once. Test modules here therefore import
Airflow inside tests and fixtures, never at module level."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from daert.local.airflow import AirflowSettings, EmbeddedAirflow, create_database
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess

from tests.helpers import REPO

DAGS = REPO / "dags"


@pytest.fixture(scope="session")
def airflow_db(postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> str:
    """This process configured for Airflow on a freshly migrated metadata database."""
    url = create_database(postgres.dsn, "airflow_tests")
    airflow = EmbeddedAirflow(
        AirflowSettings(dags_folder=DAGS), tmp_path_factory.mktemp("airflow"), url
    )
    airflow.migrate()
    os.environ.update({k: v for k, v in airflow.environment().items() if k.startswith("AIRFLOW")})
    return url


@pytest.fixture
def stack_env(
    monkeypatch: pytest.MonkeyPatch,
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
) -> None:
    """Where the DAG's tasks find the services (daert.clients reads these)."""
    monkeypatch.setenv("DAERT_EMBEDDING_TARGET", embedding_server.target)
    monkeypatch.setenv("DAERT_RETRIEVAL_TARGET", retrieval_server.target)


def dag_files() -> list[Path]:
    return sorted(DAGS.glob("*.py"))
