"""LoRA router settings: `DAERT_LORA_*` environment variables."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port
from daert.runtime.settings import ServerSettings

ReplicaKindName = Literal["lorax", "vllm", "tgi"]

# Replica names end up in Redis keys, route ids and metric labels: keep them plain.
REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class ReplicaConfig(BaseModel):
    """One entry of DAERT_LORA_REPLICAS (a JSON list): an inference server that applies
    LoRA adapters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Unique name: 1 to 63 characters of [A-Za-z0-9._-], starting with a "
        "letter or digit."
    )
    url: str = Field(description="Base URL of the replica's HTTP API, e.g. http://vllm-0:8000.")
    kind: ReplicaKindName = Field(
        description="lorax (loads adapters by source on demand), vllm (the router loads and "
        "unloads them through /v1/load_lora_adapter), tgi (only the adapters it was started "
        "with, see `adapters`)."
    )
    base_model: str = Field(min_length=1, description="The base model the replica serves.")
    max_resident_adapters: int = Field(
        8,
        ge=1,
        le=4096,
        description="Most adapters the replica keeps loaded at once (vLLM: --max-cpu-loras, "
        "LoRAX: --max-active-adapters); beyond it the router evicts the least popular adapter "
        "(vLLM: unloaded once no route in flight there uses it).",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="tgi only: the adapters in its LORA_ADAPTERS, named as registered; TGI "
        "cannot load others, so only these are routed to it.",
    )
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="vllm: how long loading an adapter may take (weights may be downloaded); "
        "routes for an adapter another route is loading wait this long at most.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if REPLICA_NAME.fullmatch(name) is None:
            raise ValueError(f"replica name {name!r}: use 1-63 characters of [A-Za-z0-9._-]")
        return name

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _adapters_only_for_tgi(self) -> ReplicaConfig:
        if self.adapters and self.kind != "tgi":
            raise ValueError(f"replica {self.name!r}: `adapters` is for tgi replicas only")
        if len(self.adapters) > self.max_resident_adapters:
            raise ValueError(f"replica {self.name!r}: more `adapters` than max_resident_adapters")
        return self


class LoraSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DAERT_LORA_")

    port: int = Field(DEFAULT_PORTS["lora"], ge=0, le=65535)
    metrics_port: int = Field(default_metrics_port("lora"), ge=-1, le=65535)

    # registry
    dsn: SecretStr | None = Field(
        None,
        description="PostgreSQL holding the adapter registry: libpq URI or connection string "
        "(the password may come from PGPASSWORD). Required.",
    )
    pool_min_size: int = Field(1, ge=0, description="Database connections kept open.")
    pool_max_size: int = Field(8, gt=0, description="Most database connections open at once.")
    connect_timeout_s: float = Field(
        3.0, gt=0, description="How long a call waits for a database connection before UNAVAILABLE."
    )

    # replicas and placement
    replicas: list[ReplicaConfig] = Field(
        default_factory=list,
        description="JSON list of inference replicas (fields: name, url, kind, base_model, "
        "max_resident_adapters, adapters, timeout_s). Empty: every Route is "
        "FAILED_PRECONDITION.",
    )
    default_base_model: str = Field(
        "",
        description="Base model of a Route that names none (and no adapter); empty: the first "
        "replica's.",
    )
    spill_factor: float = Field(
        2.0,
        ge=1,
        description="Adapter affinity: a replica holding the adapter gets the request unless "
        "it is overloaded, i.e. its in-flight requests exceed spill_factor x the mean over "
        "the replicas serving the base model + spill_margin; then the request spills to the "
        "least loaded replica, which loads the adapter too.",
    )
    spill_margin: int = Field(
        2,
        ge=0,
        description="Requests added to the overload limit (see spill_factor); a cold start "
        "may also go to any replica within this many requests of the least loaded one, the "
        "one whose eviction costs least.",
    )
    popularity_half_life: int = Field(
        10_000,
        ge=0,
        description="Evictions drop a replica's least popular adapter, popularity being its "
        "routes decayed with this half-life in routes (all adapters counted); 0 evicts the "
        "least recently used instead.",
    )
    route_lease_s: float = Field(
        300.0,
        gt=0,
        description="A routed request counts as in flight on its replica until ReleaseRoute or "
        "this many seconds, so a caller that never releases cannot hold load forever.",
    )
    replica_probe_interval_s: float = Field(
        5.0, gt=0, description="How often each replica's /health is probed."
    )

    # shared state
    redis_url: str | None = Field(
        None,
        description="Redis holding residency and in-flight state shared by router replicas, "
        "e.g. redis://redis:6379/0; unset: state is per process.",
    )
    redis_password: SecretStr | None = Field(None, description="Redis password, if any.")
    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        description="How long a Redis operation may take before the router goes on with its "
        "own per-process state.",
    )
    redis_key_prefix: str = Field(
        "daert:lora:", min_length=1, description="Prefix of every Redis key the router writes."
    )

    # semantic routing
    embedding_model: str = Field(
        "",
        description='Embedding model for "auto" routing (the embedding service is found '
        "through DAERT_EMBEDDING_TARGET); empty: that service's default.",
    )
    embedding_timeout_s: float = Field(
        5.0, gt=0, description="Deadline of one call to the embedding service."
    )
    min_score: float = Field(
        0.35,
        ge=-1,
        le=1,
        description='"auto": the cosine similarity the best adapter must reach; below it the '
        "tenant default, else the base model. A Route may override it. It depends on the "
        "model: with all-MiniLM-L6-v2 related requests score about 0.45 and up, unrelated ones "
        "under 0.25.",
    )
    max_query_chars: int = Field(
        4000,
        gt=0,
        description='"auto": the request text compared with the adapters\' examples is cut to '
        "this many characters (its end is kept).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LoraSettings:
        if self.dsn is None:
            raise ValueError("the adapter registry needs DAERT_LORA_DSN")
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("DAERT_LORA_POOL_MIN_SIZE is more than POOL_MAX_SIZE")
        names = [r.name for r in self.replicas]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"DAERT_LORA_REPLICAS: names repeated: {', '.join(repeated)}")
        served = {r.base_model for r in self.replicas}
        if self.default_base_model and served and self.default_base_model not in served:
            raise ValueError(
                f"DAERT_LORA_DEFAULT_BASE_MODEL {self.default_base_model!r} is served by no "
                f"replica (served: {', '.join(sorted(served))})"
            )
        return self

    @property
    def base_model(self) -> str:
        """The base model of a Route that names none."""
        if self.default_base_model or not self.replicas:
            return self.default_base_model
        return self.replicas[0].base_model
