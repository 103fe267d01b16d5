"""The chart cannot drift from the code: ConfigMaps carry exactly the variables the services'
settings classes read, and the services accept them; values.schema.json refuses bad values
with a message naming them and knows the same settings as the code."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from daert.context.config import ContextSettings
from daert.embedding.config import EmbeddingSettings
from daert.generation.config import GenerationSettings
from daert.lora.config import LoraSettings
from daert.rerank.config import RerankSettings
from daert.retrieval.config import RetrievalSettings
from daert.runtime.registry import SERVICES as IMPLEMENTED
from daert.runtime.settings import load_settings
from daert.sandbox.config import SandboxSettings
from pydantic_settings import BaseSettings

from tests.chart.conftest import ALL_ON, CHART, FULLNAME, PROFILES, render, render_error

SETTINGS: dict[str, type[BaseSettings]] = {
    "generation": GenerationSettings,
    "context": ContextSettings,
    "lora": LoraSettings,
    "embedding": EmbeddingSettings,
    "rerank": RerankSettings,
    "retrieval": RetrievalSettings,
    "sandbox": SandboxSettings,
}
# Settings the chart sets itself, and secrets that only come through secretEnv.
CHART_MANAGED = {"port", "metrics_port", "grace_period_s"}
# Data-store addresses the chart sets from `dependsOn` (or secretEnv for external ones).
SECRET_FIELDS = {
    "retrieval": {"dsn", "weaviate_api_key"},
    "generation": {"redis_url", "redis_password"},
    "context": {"redis_url", "redis_password"},
    "lora": {"dsn", "redis_url", "redis_password"},
}


def test_every_implemented_service_is_covered() -> None:
    assert set(SETTINGS) == set(IMPLEMENTED)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("DAERT_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("profile", ["default", "dev", "prod"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_config_maps_hold_only_variables_the_service_reads(
    name: str, profile: str, clean_env: pytest.MonkeyPatch
) -> None:
    rendered = render({name: {"enabled": True}}, files=PROFILES[profile])
    data = rendered.get("ConfigMap", f"{FULLNAME}-{name}")["data"]
    settings_cls = SETTINGS[name]
    prefix = f"DAERT_{name.upper()}_"
    fields = set(settings_cls.model_fields)
    assert data
    for key in data:
        if key.endswith("_TARGET") and key.removeprefix("DAERT_").count("_") == 1:
            continue  # the address of a service it calls, read by daert.clients
        assert key.startswith(prefix), f"{key}: not a {name} setting"
        assert key.removeprefix(prefix).lower() in fields, (
            f"{key}: {settings_cls.__name__} has no such field"
        )
    # The service itself accepts them: its settings load without an error.
    for key, value in data.items():
        clean_env.setenv(key, value)
    settings: Any = load_settings(settings_cls)
    assert settings.port == int(data[prefix + "PORT"])
    assert settings.metrics_port == int(data[prefix + "METRICS_PORT"])
    assert settings.grace_period_s == float(data[prefix + "GRACE_PERIOD_S"])


def test_config_values_reach_the_settings_typed(clean_env: pytest.MonkeyPatch) -> None:
    values = {
        "embedding": {
            "config": {
                "models": [
                    {"name": "all-MiniLM-L6-v2"},
                    {"name": "e5", "path": "/models/e5", "query_prefix": "query: "},
                ],
                "max_request_chars": 2000000,
                "max_batch_wait_ms": 2.5,
            }
        }
    }
    data = render(values).get("ConfigMap", f"{FULLNAME}-embedding")["data"]
    # Whole numbers stay whole (no 2e+06), lists become JSON.
    assert data["DAERT_EMBEDDING_MAX_REQUEST_CHARS"] == "2000000"
    assert data["DAERT_EMBEDDING_MAX_BATCH_WAIT_MS"] == "2.5"
    assert json.loads(data["DAERT_EMBEDDING_MODELS"])[1]["path"] == "/models/e5"
    for key, value in data.items():
        clean_env.setenv(key, value)
    settings = load_settings(EmbeddingSettings)
    assert [m.name for m in settings.models] == ["all-MiniLM-L6-v2", "e5"]
    assert settings.models[1].query_prefix == "query: "
    assert settings.max_request_chars == 2_000_000


def test_sandbox_limits_as_json_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    limits = {
        "timeout_ms": 5000,
        "cpu_time_ms": 5000,
        "memory_mb": 512,
        "max_processes": 16,
        "max_output_bytes": 65536,
        "max_file_bytes": 1048576,
    }
    data = render({"sandbox": {"config": {"default_limits": limits}}}).get(
        "ConfigMap", f"{FULLNAME}-sandbox"
    )["data"]
    for key, value in data.items():
        clean_env.setenv(key, value)
    settings = load_settings(SandboxSettings)
    assert settings.default_limits.memory_mb == 512
    assert settings.driver == "process"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_schema_knows_exactly_the_settings_of_the_code(name: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"][name]["properties"]["config"]
    assert config["additionalProperties"] is False
    in_schema = set(config["properties"])
    in_code = set(SETTINGS[name].model_fields)
    assert in_schema | CHART_MANAGED | SECRET_FIELDS.get(name, set()) == in_code
    assert not in_schema & (CHART_MANAGED | SECRET_FIELDS.get(name, set()))
    # Enums match the code's Literal types.
    for field, info in SETTINGS[name].model_fields.items():
        prop = config["properties"].get(field, {})
        if "enum" in prop:
            assert set(prop["enum"]) == set(info.annotation.__args__), field  # type: ignore[union-attr]


def test_dependencies_set_client_targets() -> None:
    data = render(ALL_ON).get("ConfigMap", f"{FULLNAME}-gateway")["data"]
    assert data["DAERT_EMBEDDING_TARGET"] == f"{FULLNAME}-embedding:50052"
    assert data["DAERT_LORA_TARGET"] == f"{FULLNAME}-lora:50057"
    assert "DAERT_SANDBOX_TARGET" not in data
    # A dependency that is off is neither a target nor an egress rule.
    values = {"gateway": {"enabled": True}, "generation": {"enabled": False}}
    data = render(values).get("ConfigMap", f"{FULLNAME}-gateway")["data"]
    assert "DAERT_GENERATION_TARGET" not in data
    assert data["DAERT_RETRIEVAL_TARGET"] == f"{FULLNAME}-retrieval:50053"


# --- the schema refuses bad values -------------------------------------------------------------

BAD_VALUES = [
    (["embedding.replicaCount=-1"], "/embedding/replicaCount", "minimum"),
    (["retrieval.config.backend=faiss"], "/retrieval/config/backend", "must be one of"),
    (["sandbox.config.driver=docker"], "/sandbox/config/driver", "must be one of"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy", "must be one of"),
    (["modelCache.type=hostPath"], "/modelCache/type", "must be one of"),
    (["logLevel=LOUD"], "/logLevel", "must be one of"),
    (["embedding.port=70000"], "/embedding/port", "maximum"),
    (["rerank.metricsPort=-2"], "/rerank/metricsPort", "minimum"),
    (["unknownKey=1"], "", "additional properties 'unknownKey' not allowed"),
    (["embedding.replicas=2"], "/embedding", "additional properties 'replicas' not allowed"),
    (["embedding.config.max_batch_sise=3"], "/embedding/config", "'max_batch_sise' not allowed"),
    (["retrieval.config.port=1"], "/retrieval/config", "'port' not allowed"),
    (["retrieval.config.dsn=postgresql://u:p@h/db"], "/retrieval/config", "'dsn' not allowed"),
    (["retrieval.config.backend=weaviate"], "/retrieval/config", "missing property 'weaviate_url'"),
    (["embedding.config.max_batch_size=0"], "/embedding/config/max_batch_size", "minimum"),
    (["postgresql.external.sslmode=maybe"], "/postgresql/external/sslmode", "must be one of"),
    (["generation.config.port=1"], "/generation/config", "not"),
    (["lora.dependsOn={lora}"], "/lora/dependsOn/0", "must be one of"),
    (["lora.dependsOn={mysql}"], "/lora/dependsOn/0", "must be one of"),
    (["sandbox.runtimeClassName=Not_Valid"], "/sandbox/runtimeClassName", "does not match pattern"),
    (["redis.database=16"], "/redis/database", "maximum"),
    (["context.config.keep_last_messages=-1"], "/context/config/keep_last_messages", "minimum"),
    (["context.config.summary_ttl_s=0"], "/context/config/summary_ttl_s", "exclusiveMinimum"),
    (["context.config.summary_modle=x"], "/context/config", "'summary_modle' not allowed"),
    (["context.config.redis_url=redis://r"], "/context/config", "'redis_url' not allowed"),
    (["context.config.tokenizers[0].name=t"], "/context/config/tokenizers/0", "'kind'"),
    (
        ["context.config.tokenizers[0].name=t", "context.config.tokenizers[0].kind=tiktoken"],
        "/context/config/tokenizers/0/kind",
        "must be one of",
    ),
    (
        ["context.config.tokenizers[0].name=t", "context.config.tokenizers[0].kind=llama_cpp"],
        "/context/config/tokenizers/0",
        "missing property 'url'",
    ),
    (
        ["context.config.tokenizers[0].name=t", "context.config.tokenizers[0].kind=huggingface"],
        "/context/config/tokenizers/0",
        "missing property 'path'",
    ),
    (["context.dependsOn={context}"], "/context/dependsOn/0", "must be one of"),
    (["generation.config.models=null"], "/generation/config/models", "got null, want array"),
]


@pytest.mark.parametrize(
    ("sets", "where", "message"), BAD_VALUES, ids=[b[0][0] for b in BAD_VALUES]
)
def test_schema_refuses_bad_values(sets: list[str], where: str, message: str) -> None:
    error = render_error(sets=sets)
    assert error.returncode != 0
    assert "values don't meet the specifications of the schema" in error.stderr
    assert f"at '{where}'" in error.stderr, error.stderr
    assert message in error.stderr, error.stderr


def test_schema_refuses_a_string_where_a_number_belongs() -> None:
    error = render_error({"embedding": {"replicaCount": "two"}})
    assert "at '/embedding/replicaCount'" in error.stderr
    assert "got string, want integer" in error.stderr


def test_every_value_is_documented() -> None:
    """Bitnami style: every leaf of values.yaml has an `## @param` line (or sits under one)."""
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    documented = {
        line.split("@param", 1)[1].split()[0] for line in text.splitlines() if "@param" in line
    }

    def leaves(node: Any, path: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [
                leaf
                for key, value in node.items()
                for leaf in leaves(value, f"{path}.{key}".lstrip("."))
            ]
        return [path]

    missing = []
    for leaf in leaves(values, ""):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(len(parts), 0, -1)):
            missing.append(leaf)
    assert not missing, missing
