"""The gateway in `daert up`: `daert serve gateway` as a supervised child on port 8000 (or
DAERT_GATEWAY_PORT), its keys in the embedded PostgreSQL, its limits in the embedded Redis,
and a development API key kept in the state folder so that it survives restarts."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from functools import partial
from pathlib import Path

from daert.gateway.config import GatewaySettings
from daert.gateway.keys import KeyStore
from daert.local.child import http_ok, terminate, wait_ready

# The tenant of the development key; documents ingested for it are what it can search.
DEV_TENANT = ""
DEV_KEY_NAME = "daert up development key"


class EmbeddedGateway:
    def __init__(self, settings: GatewaySettings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.log_file = state_dir / "gateway.log"
        self.key_file = state_dir / "dev-key"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.settings.port}"

    def dev_key(self) -> str:
        """The development key: made once, then read back (owner-only file)."""
        if self.key_file.exists():
            return self.key_file.read_text().strip()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        token = "dk-dev-" + secrets.token_urlsafe(24)
        descriptor = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(token + "\n")
        return token

    async def _register_dev_key(self) -> None:
        store = KeyStore(self.settings.dsn)
        await store.open()
        try:
            key = await store.ensure(self.dev_key(), tenant=DEV_TENANT, name=DEV_KEY_NAME)
        finally:
            await store.close()
        if key.revoked_at is not None:
            raise RuntimeError(
                f"the development API key in {self.key_file} was revoked; delete the file "
                "and start again for a new one"
            )

    def start(self, timeout_s: float = 60.0) -> None:
        asyncio.run(self._register_dev_key())
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "daert", "serve", "gateway"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
        ready = partial(http_ok, f"http://127.0.0.1:{self.settings.port}/healthz")
        try:
            wait_ready(self._process, ready, "the gateway", self.log_file, timeout_s)
        except RuntimeError:
            self.stop()
            raise

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def wait(self) -> int | None:
        return None if self._process is None else self._process.wait()

    def stop(self) -> None:
        terminate(self._process, self.settings.grace_period_s + 5)
