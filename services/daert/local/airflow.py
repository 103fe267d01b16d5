"""The embedded Airflow 3 of `daert up`: api-server (UI and REST API v2), scheduler,
dag-processor and triggerer as four child processes with the LocalExecutor, running the DAGs
in dags/ (the `airflow` extra).

Its metadata lives in a database of its own (`airflow`) on the embedded PostgreSQL, or in the
database DAERT_AIRFLOW_DATABASE_URL names. Its home (config secrets, the generated admin
password, logs) is a folder under the stack's state folder. Every setting is passed to the
children as an AIRFLOW__SECTION__KEY variable, so the user's own airflow.cfg stays untouched.
Settings: `DAERT_AIRFLOW_*` (AirflowSettings).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8080
# The DAGs of this repository, for a stack started from its root (`make up`).
LOCAL_DAGS = Path("dags")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# The components /api/v2/monitor/health reports on; all healthy means DAGs get parsed and run.
_HEALTH_KEYS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
ADMIN_USER = "admin"


class AirflowSettings(BaseSettings):
    """`DAERT_AIRFLOW_*`: the Airflow that `daert up` runs next to the services."""

    model_config = SettingsConfigDict(env_prefix="DAERT_AIRFLOW_")

    enabled: bool = Field(True, description="false: run no Airflow.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="UI and REST API port.")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the metadata database (postgresql+psycopg://...); "
        "empty: a database `airflow` on the embedded PostgreSQL.",
    )
    dags_folder: Path = Field(LOCAL_DAGS, description="Folder of the DAG files.")
    parallelism: int = Field(
        4, ge=1, description="Task instances running at once (LocalExecutor worker processes)."
    )
    start_timeout_s: float = Field(
        240.0, gt=0, description="Seconds for migrations and the components to turn healthy."
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, url: str) -> str:
        """psycopg 3 is the driver installed (SQLAlchemy's default would be psycopg2)."""
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url.removeprefix(plain)
        if url and not url.startswith("postgresql+psycopg://"):
            raise ValueError("must be a PostgreSQL URL: postgresql+psycopg://user:pass@host/db")
        return url


def create_database(server_dsn: str, name: str = "airflow") -> str:
    """Create database `name` on the server of `server_dsn` unless it exists; returns a
    SQLAlchemy URL for it (psycopg 3 driver, the Unix socket of the DSN kept)."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
        info = conn.info
        host, user, port = info.host, info.user, info.port
    # pgserver listens on a socket folder only: SQLAlchemy takes it as ?host=.
    return f"postgresql+psycopg://{user}@/{name}?host={host}&port={port}"


def _json(url: str, timeout_s: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return json.loads(reply.read())


class EmbeddedAirflow:
    """Airflow's four components as child processes. `start` migrates the metadata database
    and returns once /api/v2/monitor/health reports every component healthy; `stop` ends
    them. `poll`/`wait` see the first component to exit: one gone stops the stack."""

    def __init__(
        self,
        settings: AirflowSettings,
        home: Path,
        database_url: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.home = home.resolve()
        self.log_dir = self.home / "logs"
        self.password_file = self.home / "simple_auth_manager_passwords.json.generated"
        self.database_url = database_url
        self.extra_env = extra_env or {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://localhost:{self.settings.port}"

    def _secrets(self) -> dict[str, str]:
        """Keys every component must share (JWTs between scheduler, workers and api-server;
        the Fernet key of stored connections), generated once and kept in the home folder."""
        path = self.home / "secrets.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        from cryptography.fernet import Fernet

        values = {
            "jwt_secret": secrets.token_urlsafe(32),
            "secret_key": secrets.token_urlsafe(32),
            "fernet_key": Fernet.generate_key().decode(),
        }
        path.write_text(json.dumps(values))
        path.chmod(0o600)
        return values

    def environment(self) -> dict[str, str]:
        keys = self._secrets()
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(self.settings.dags_folder.resolve()),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM=str(self.settings.parallelism),
            # A local stack: a DAG dropped into dags/ can be triggered at once.
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__FERNET_KEY=keys["fernet_key"],
            AIRFLOW__CORE__AUTH_MANAGER=(
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{ADMIN_USER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(self.password_file),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.url}/execution/",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.database_url,
            # Airflow would derive asyncpg for its async engine; psycopg 3 does both.
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=self.database_url.replace(
                "postgresql+psycopg://", "postgresql+psycopg_async://", 1
            ),
            AIRFLOW__API__PORT=str(self.settings.port),
            AIRFLOW__API__BASE_URL=self.url,
            AIRFLOW__API__SECRET_KEY=keys["secret_key"],
            AIRFLOW__API_AUTH__JWT_SECRET=keys["jwt_secret"],
            AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(self.log_dir / "tasks"),
            AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY=str(
                self.log_dir / "dag-processor"
            ),
            # New DAG files show up within seconds, not Airflow's 5 minutes (changed ones
            # within its 30 s re-parse interval).
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="10",
        )
        return env

    def _airflow(self) -> list[str]:
        # The `airflow` script of this interpreter's environment, so a venv needs no activation.
        script = Path(sys.executable).with_name("airflow")
        if script.exists():
            return [str(script)]
        found = shutil.which("airflow")
        if not found:
            raise RuntimeError(
                "Airflow is not installed: pip install 'daert[airflow]' (make setup does), "
                "or turn it off with DAERT_AIRFLOW_ENABLED=false"
            )
        return [found]

    def migrate(self) -> None:
        """Create or upgrade the metadata database's schema (`airflow db migrate`)."""
        folder = self.settings.dags_folder
        if not folder.is_dir():
            raise RuntimeError(f"DAERT_AIRFLOW_DAGS_FOLDER: no folder at {folder}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        migrate_log = self.log_dir / "db-migrate.log"
        with migrate_log.open("ab") as log:
            done = subprocess.run(
                [*self._airflow(), "db", "migrate"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=self.settings.start_timeout_s,
                check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(
                f"airflow db migrate failed (exit {done.returncode}); see {migrate_log}"
            )

    def start(self) -> str:
        """Migrate the metadata database, start the components, wait until healthy."""
        self.migrate()
        env = self.environment()
        for component in COMPONENTS:
            with (self.log_dir / f"{component}.log").open("ab") as log:
                # A process group each: the scheduler's task runners and the api-server's
                # workers are stopped with their component, even one that was killed.
                self.processes[component] = subprocess.Popen(
                    [*self._airflow(), component],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )
        try:
            self._wait_healthy(self.settings.start_timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self.url

    def _unhealthy(self) -> list[str]:
        """The components /api/v2/monitor/health does not report healthy (all, while the
        api-server does not answer)."""
        try:
            health = _json(f"{self.url}/api/v2/monitor/health")
        except (urllib.error.URLError, OSError, ValueError):
            return list(_HEALTH_KEYS)
        return [k for k in _HEALTH_KEYS if health.get(k, {}).get("status") != "healthy"]

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for component, process in self.processes.items():
                code = process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"airflow {component} exited with code {code} while starting; "
                        f"see {self.log_dir / component}.log"
                    )
            unhealthy = self._unhealthy()
            if not unhealthy:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Airflow not healthy within {timeout_s:g} s ({', '.join(unhealthy)} not "
                    f"healthy); see the logs in {self.log_dir}"
                )
            time.sleep(1.0)

    def admin_password(self) -> str:
        """The admin password the simple auth manager generated into its file."""
        return str(json.loads(self.password_file.read_text())[ADMIN_USER])

    def poll(self) -> int | None:
        """The exit code of the first component found ended, else None."""
        for process in self.processes.values():
            code = process.poll()
            if code is not None:
                return code
        return None

    def wait(self) -> int | None:
        """Block until a component ends; its exit code (None when none was started)."""
        while self.processes:
            code = self.poll()
            if code is not None:
                return code
            time.sleep(0.5)
        return None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to every component's process group, SIGKILL to what is left after
        `grace_s`."""
        processes, self.processes = self.processes, {}
        for process in processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        for process in processes.values():
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has ended
        os.killpg(process.pid, sig)
