"""Sandbox service settings: `DAERT_SANDBOX_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings

MIB = 1024 * 1024


class Limits(BaseModel):
    """Resource limits of one execution (all > 0)."""

    timeout_ms: int = Field(gt=0)
    cpu_time_ms: int = Field(gt=0)
    memory_mb: int = Field(gt=0)
    max_processes: int = Field(gt=0)
    max_output_bytes: int = Field(gt=0)
    max_file_bytes: int = Field(gt=0)


DEFAULT_LIMITS = Limits(
    timeout_ms=10_000,
    cpu_time_ms=10_000,
    memory_mb=1024,
    max_processes=32,
    max_output_bytes=1 * MIB,
    max_file_bytes=16 * MIB,
)
MAX_LIMITS = Limits(
    timeout_ms=120_000,
    cpu_time_ms=120_000,
    memory_mb=4096,
    max_processes=256,
    max_output_bytes=4 * MIB,
    max_file_bytes=256 * MIB,
)


class SandboxSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_SANDBOX_")

    port: int = Field(DEFAULT_PORTS["sandbox"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("sandbox"), ge=-1, le=65535)
    driver: Literal["bubblewrap", "process"] = Field(
        "bubblewrap",
        description="bubblewrap: namespaces, no network, read-only minimal filesystem (one "
        "machine). process: rlimits only, safe only inside a gVisor pod with a deny-all "
        "NetworkPolicy (Kubernetes).",
    )
    python: Path = Field(Path("/usr/bin/python3"), description="Interpreter the code runs on.")
    packages_dir: Path | None = Field(
        None,
        description="Read-only folder of allowed packages (pip --target), e.g. numpy, pandas, "
        "matplotlib. Nothing is installed at run time.",
    )
    pool_size: int = Field(4, ge=0, description="Pre-started interpreters kept warm.")
    max_concurrent: int = Field(
        8, gt=0, description="Executions at once; beyond it RESOURCE_EXHAUSTED."
    )
    max_sessions: int = Field(32, gt=0, description="Open sessions at once.")
    session_idle_ttl_s: float = Field(600, gt=0, description="Default idle TTL of a session.")
    max_session_idle_ttl_s: float = Field(3600, gt=0, description="Longest idle TTL allowed.")
    workspace_mb: int = Field(64, gt=0, description="Size of each sandbox's tmpfs workspace.")
    max_code_bytes: int = Field(1 * MIB, gt=0, description="Largest `code` accepted.")
    max_input_files: int = Field(64, ge=0, description="Most files per request.")
    max_input_bytes: int = Field(32 * MIB, gt=0, description="Most bytes of files per request.")
    max_returned_file_bytes: int = Field(
        4 * MIB, ge=0, description="Most bytes of written files returned per execution."
    )
    max_rich_output_bytes: int = Field(
        2 * MIB, ge=0, description="Most bytes of figures (PNG) returned per execution."
    )
    sandbox_uid_base: int = Field(
        200_000,
        gt=0,
        description="When the service runs as root, each sandbox runs as its own uid from "
        "here on, so RLIMIT_NPROC bounds that sandbox alone.",
    )
    default_limits: Limits = DEFAULT_LIMITS
    max_limits: Limits = MAX_LIMITS

    @model_validator(mode="after")
    def _consistent(self) -> SandboxSettings:
        for name, value in self.default_limits.model_dump().items():
            if value > getattr(self.max_limits, name):
                raise ValueError(f"default_limits.{name} exceeds max_limits.{name}")
        # The largest possible result must fit in one response message.
        largest = (
            2 * self.max_limits.max_output_bytes
            + self.max_returned_file_bytes
            + self.max_rich_output_bytes
            + 2 * MIB  # the repr of the last value, file names, metadata
        )
        if largest > self.max_send_message_bytes:
            raise ValueError(
                f"a result may reach {largest} bytes (2 x max_limits.max_output_bytes + "
                "max_returned_file_bytes + max_rich_output_bytes + 2 MiB), more than "
                f"max_send_message_bytes={self.max_send_message_bytes}"
            )
        return self
