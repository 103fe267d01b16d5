"""An embedded PostgreSQL 16 + pgvector from the `pgserver` wheel (the `local` extra).

pgserver runs initdb and pg_ctl from the binaries in its wheel, as an unprivileged
`pgserver` user when started as root, listening on a Unix socket in the data folder only.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any


def _pgserver() -> Any:
    """The pgserver module (untyped: its command functions are generated at import)."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            return importlib.import_module("pgserver")
    except ImportError:
        raise RuntimeError(
            "the embedded PostgreSQL needs the pgserver wheel: pip install 'daert[local]'"
        ) from None


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; it keeps running until `stop`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start the server (initialising the folder on first use); returns its DSN."""
        pgserver = _pgserver()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self._server is None:
                # cleanup_mode=None: the server outlives this handle; `stop` ends it.
                self._server = pgserver.get_server(self.data_dir, cleanup_mode=None)
            else:
                with self._server._lock:
                    self._server.ensure_postgres_running()
        except Exception as exc:
            log_file = self.data_dir / "log"
            raise RuntimeError(
                f"the embedded PostgreSQL in {self.data_dir} did not start ({exc}); see {log_file}"
            ) from exc
        return self.dsn

    @property
    def dsn(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are disconnected)."""
        if self._server is None or not (self.data_dir / "postmaster.pid").exists():
            return  # never started, or already stopped
        _pgserver().pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user
        )
