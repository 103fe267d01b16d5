"""Airflow for the DAG tests: configured in this process (its metadata in a database of its
own on the session's real PostgreSQL, migrated by `airflow db migrate`) before the first
`import airflow`, which reads its configuration once. Test modules here therefore import
Airflow inside tests and fixtures, never at module level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from daert.local.airflow import ADMIN_USER, AirflowSettings, EmbeddedAirflow, create_database
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess

from tests.helpers import REPO, free_port

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


@dataclass(frozen=True)
class AirflowApi:
    """An `airflow api-server` on this process's Airflow configuration."""

    url: str
    password_file: Path

    def client(self) -> httpx.Client:
        """A REST API client logged in as the admin."""
        password = json.loads(self.password_file.read_text())[ADMIN_USER]
        token = httpx.post(
            f"{self.url}/auth/token", json={"username": ADMIN_USER, "password": password}
        )
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def airflow_api(airflow_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowApi]:
    """The api-server next to `airflow_db`: the Execution API that `dag.test(use_executor=True)`
    workers (LocalExecutor processes, so tasks run at the same time) report to, and the REST
    API a person uses (e.g. to answer a human-in-the-loop task)."""
    port = free_port()
    url = f"http://localhost:{port}"
    log = tmp_path_factory.mktemp("api-server") / "api-server.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__API__PORT", str(port))
        env.setenv("AIRFLOW__API__BASE_URL", url)
        env.setenv("AIRFLOW__API__WORKERS", "1")
        env.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{url}/execution/")
        airflow = str(Path(sys.executable).with_name("airflow"))
        with log.open("wb") as sink:
            server = subprocess.Popen(
                [airflow, "api-server", "--port", str(port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        try:
            deadline = time.monotonic() + 180
            while not _answers(f"{url}/api/v2/monitor/health"):
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"api-server not up:\n{log.read_text()}"
                time.sleep(0.5)
            yield AirflowApi(
                url, Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
