"""Typed configuration from the environment (`DAERT_<SERVICE>_<SETTING>`), validated at start-up."""

from __future__ import annotations

import re
import sys
from typing import Literal, Protocol, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsError

MIB = 1024 * 1024


class ServerSettings(BaseSettings):
    """Settings every service server shares. A service subclasses this, sets its
    `env_prefix` (e.g. ``DAERT_EMBEDDING_``) and its default port, and adds its own fields."""

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(
        0, ge=-1, le=65535, description="Prometheus /metrics port; 0 picks a free one, -1 disables."
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight RPCs may run before they are cut."
    )
    max_receive_message_bytes: int = Field(16 * MIB, gt=0, description="Largest request accepted.")
    max_send_message_bytes: int = Field(16 * MIB, gt=0, description="Largest response sent.")
    health_interval_s: float = Field(
        5.0, gt=0, description="How often backend readiness is re-checked for grpc.health.v1."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class _Named(Protocol):
    name: str


NamedT = TypeVar("NamedT", bound=_Named)


def unique_names(entries: list[NamedT]) -> list[NamedT]:
    """Validator for a list of named entries (models, replicas): every name once.
    Use as ``_unique = field_validator("models")(unique_names)``."""
    names = [entry.name for entry in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"names must be unique; repeated: {', '.join(duplicates)}")
    return entries


class ConfigError(Exception):
    """A configuration value is invalid; the message names the environment variable."""


def load_settings(settings_cls: type[SettingsT]) -> SettingsT:
    """Build settings from the environment or raise ConfigError naming every bad variable."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    try:
        return settings_cls()
    except SettingsError as exc:  # a complex value (list, object) that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        where = prefix + field.group(1).upper() if field else prefix + "*"
        raise ConfigError(f"invalid configuration:\n  {where}: not valid JSON") from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name, *path = [str(part) for part in error["loc"]] or [""]
            # A settings-wide check has no field: then the prefix alone is named.
            where = prefix + name.upper() + "".join(f"[{p}]" for p in path)
            got = error.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            problems.append(f"{where}: {error['msg']}{shown}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def load_settings_or_exit(settings_cls: type[SettingsT]) -> SettingsT:
    """For process start-up: a bad value stops the process with a message naming it."""
    try:
        return load_settings(settings_cls)
    except ConfigError as exc:
        print(f"daert: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
