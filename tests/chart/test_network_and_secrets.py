"""NetworkPolicies (the sandbox reaches nothing; the others only what they need) and secrets
(never in a ConfigMap, always secretKeyRefs)."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from tests.chart.conftest import ALL_ON, FULLNAME, PROFILES, RELEASE, SERVICES, render

RELEASE_PEER = {
    "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "daert", "app.kubernetes.io/instance": RELEASE}
    }
}


def policy(rendered: Any, name: str) -> dict[str, Any]:
    return rendered.get("NetworkPolicy", f"{FULLNAME}-{name}")["spec"]


def egress_components(spec: dict[str, Any]) -> dict[str, list[int]]:
    """component (or 'dns', 'ipBlock', 'any') -> allowed ports."""
    out: dict[str, list[int]] = {}
    for rule in spec["egress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        peers = rule.get("to") or [{}]
        for peer in peers:
            if "ipBlock" in peer:
                key = "ipBlock"
            elif "namespaceSelector" in peer:
                key = "dns" if ports == [53, 53] else "namespace"
            elif "podSelector" in peer:
                key = peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "pod")
            else:
                key = "any"
            out.setdefault(key, []).extend(ports)
    return out


@pytest.mark.parametrize("profile", ["default", "dev", "prod"])
def test_sandbox_network_policy_denies_all_egress(profile: str) -> None:
    # Even with every other service on and extra peers configured for the others.
    values = {**ALL_ON, "networkPolicy": {"extraIngressFrom": [{"namespaceSelector": {}}]}}
    spec = policy(render(values, files=PROFILES[profile]), "sandbox")
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "sandbox"
    # In: only its gRPC port, only from the release's pods.
    assert spec["ingress"] == [
        {"from": [RELEASE_PEER], "ports": [{"port": 50055, "protocol": "TCP"}]}
    ]


def test_sandbox_clients_are_named_for_it_alone() -> None:
    airflow = {"podSelector": {"matchLabels": {"tier": "airflow"}}}
    values = {"sandbox": {"networkPolicy": {"clientsFrom": [airflow]}}}
    rendered = render(values)
    spec = policy(rendered, "sandbox")
    assert spec["ingress"] == [
        {"from": [RELEASE_PEER, airflow], "ports": [{"port": 50055, "protocol": "TCP"}]}
    ]
    assert spec["egress"] == []
    # The other services' policies are not widened by it.
    assert airflow not in policy(rendered, "embedding")["ingress"][0]["from"]


def test_sandbox_egress_cannot_be_configured() -> None:
    from tests.chart.conftest import render_error

    error = render_error({"sandbox": {"networkPolicy": {"extraEgress": [{"to": []}]}}})
    assert "additional properties 'extraEgress' not allowed" in error.stderr
    error = render_error({"sandbox": {"dependsOn": ["redis"]}})
    assert "/sandbox/dependsOn" in error.stderr


def test_each_service_reaches_only_what_it_needs() -> None:
    rendered = render(ALL_ON)
    expected = {
        "embedding": {"dns": [53, 53]},
        "rerank": {"dns": [53, 53]},
        "retrieval": {"dns": [53, 53], "postgresql": [5432]},
        "generation": {
            "dns": [53, 53],
            "redis": [6379],
            "lora": [50057],
            "embedding": [50052],
            "llm": [8090],
        },
        "context": {
            "dns": [53, 53],
            "generation": [50051],
            "embedding": [50052],
            "redis": [6379],
            "llm": [8090],
        },
        "lora": {"dns": [53, 53], "postgresql": [5432], "redis": [6379], "embedding": [50052]},
        "gateway": {
            "dns": [53, 53],
            "generation": [50051],
            "embedding": [50052],
            "retrieval": [50053],
            "rerank": [50054],
            "context": [50056],
            "lora": [50057],
            "postgresql": [5432],
            "redis": [6379],
        },
    }
    for name, allowed in expected.items():
        spec = policy(rendered, name)
        assert spec["policyTypes"] == ["Ingress", "Egress"], name
        assert egress_components(spec) == allowed, name


@pytest.mark.parametrize("name", [s for s in SERVICES if s != "sandbox"])
def test_ingress_from_the_release_and_metrics_from_monitoring(name: str) -> None:
    rendered = render(ALL_ON)
    spec = policy(rendered, name)
    service = rendered.get("Service", f"{FULLNAME}-{name}")["spec"]["ports"]
    port, metrics = service[0]["port"], service[1]["port"]
    assert spec["ingress"][0] == {
        "from": [RELEASE_PEER],
        "ports": [{"port": port, "protocol": "TCP"}],
    }
    assert spec["ingress"][1] == {
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "ports": [{"port": metrics, "protocol": "TCP"}],
    }
    assert len(spec["ingress"]) == 2


def test_extra_egress_and_external_stores_and_weaviate() -> None:
    values = {
        "generation": {
            "enabled": True,
            "networkPolicy": {
                "extraEgress": [
                    {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 8080}]}
                ]
            },
        },
        "lora": {"enabled": True},
        "postgresql": {
            "enabled": False,
            "auth": {"existingSecret": "managed-pg"},
            "external": {"host": "pg.example.internal", "cidrs": ["10.30.0.0/24"]},
        },
        "redis": {"enabled": False, "external": {"host": "redis.example.internal", "tls": True}},
        "retrieval": {
            "config": {"backend": "weaviate", "weaviate_url": "http://weaviate.search:80"},
            "weaviate": {"to": [{"namespaceSelector": {"matchLabels": {"name": "search"}}}]},
        },
    }
    rendered = render(values)
    generation = policy(rendered, "generation")
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 8080}]} in generation[
        "egress"
    ]
    lora = policy(rendered, "lora")
    assert {
        "to": [{"ipBlock": {"cidr": "10.30.0.0/24"}}],
        "ports": [{"port": 5432, "protocol": "TCP"}],
    } in lora["egress"]
    retrieval = policy(rendered, "retrieval")
    assert egress_components(retrieval) == {"dns": [53, 53], "namespace": [8080, 50051]}
    # No chart-run data stores: external ones are used.
    assert not rendered.of("StatefulSet")
    assert f"{FULLNAME}-redis" not in rendered.names("Deployment")
    lora_config = rendered.get("ConfigMap", f"{FULLNAME}-lora")["data"]
    assert lora_config["DAERT_LORA_DSN"] == (
        "postgresql://daert@pg.example.internal:5432/daert?sslmode=prefer"
    )
    assert lora_config["DAERT_LORA_REDIS_URL"] == "rediss://redis.example.internal:6379/0"
    env = {
        e["name"]: e
        for e in rendered.get("Deployment", f"{FULLNAME}-lora")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "managed-pg",
        "key": "password",
    }
    retrieval_config = rendered.get("ConfigMap", f"{FULLNAME}-retrieval")["data"]
    assert retrieval_config["DAERT_RETRIEVAL_BACKEND"] == "weaviate"
    assert "DAERT_RETRIEVAL_DSN" not in retrieval_config


def test_external_postgresql_needs_a_host_and_a_secret() -> None:
    from tests.chart.conftest import render_error

    error = render_error({"postgresql": {"enabled": False}})
    assert "postgresql.external.host is required" in error.stderr
    error = render_error({"postgresql": {"enabled": False, "external": {"host": "pg"}}})
    assert "postgresql.auth.existingSecret is required" in error.stderr


def test_network_policies_can_be_turned_off() -> None:
    assert not render({"networkPolicy": {"enabled": False}}).of("NetworkPolicy")


# --- secrets ----------------------------------------------------------------------------------

# A token is a secret (HF_TOKEN, ..._API_TOKEN); tokenizers and token counts are not.
SECRET_LIKE = re.compile(r"(password|passwd|secret|token$|api_key|apikey)", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


@pytest.mark.parametrize("profile", ["default", "dev", "prod", "all-on"])
def test_no_secret_values_in_config_maps(profile: str) -> None:
    rendered = render(ALL_ON) if profile == "all-on" else render(files=PROFILES[profile])
    passwords = [
        base64.b64decode(value).decode()
        for secret in rendered.of("Secret")
        for value in secret["data"].values()
    ]
    assert passwords, "the chart generates database passwords"
    for config_map in rendered.of("ConfigMap"):
        for key, value in config_map["data"].items():
            where = f"{config_map['metadata']['name']}: {key}"
            assert not SECRET_LIKE.search(key), where
            assert not URL_WITH_PASSWORD.search(value), where
            assert "password=" not in value.lower(), where
            for password in passwords:
                assert password not in value, where
    # Nor as plain env values anywhere.
    for deployment in rendered.of("Deployment") + rendered.of("StatefulSet"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            for entry in c.get("env", []):
                if SECRET_LIKE.search(entry["name"]) or entry["name"].endswith("_DSN"):
                    assert "value" not in entry, (
                        f"{deployment['metadata']['name']}: {entry['name']}"
                    )
                    assert "secretKeyRef" in entry["valueFrom"]


def test_secret_like_names() -> None:
    for name in ("DAERT_X_PASSWORD", "HF_TOKEN", "DAERT_GENERATION_API_KEY", "X_SECRET_FILE"):
        assert SECRET_LIKE.search(name), name
    for name in ("DAERT_CONTEXT_TOKENIZERS", "DAERT_CONTEXT_SUMMARY_CHUNK_TOKENS"):
        assert not SECRET_LIKE.search(name), name


def test_values_files_hold_no_secrets() -> None:
    from tests.chart.conftest import CHART

    for path in [CHART / "values.yaml", *PROFILES["dev"], *PROFILES["prod"]]:
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), path
        for line in text.splitlines():
            if line.strip().startswith("#"):
                continue
            match = re.match(r"\s*(\w*(password|token|apiKey|api_key)\w*):\s*(\S.*)$", line, re.I)
            if match and match.group(1) not in ("passwordKey", "automountToken"):
                pytest.fail(f"{path.name}: {line.strip()}")


def test_retrieval_dsn_and_api_key_come_from_secrets() -> None:
    rendered = render()
    config = rendered.get("ConfigMap", f"{FULLNAME}-retrieval")["data"]
    assert config["DAERT_RETRIEVAL_DSN"] == f"postgresql://daert@{FULLNAME}-postgresql:5432/daert"
    env = {
        e["name"]: e
        for e in rendered.get("Deployment", f"{FULLNAME}-retrieval")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-postgresql",
        "key": "password",
    }
    postgres = rendered.get("StatefulSet", f"{FULLNAME}-postgresql")
    pg_env = {e["name"]: e for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"] == env["PGPASSWORD"]["valueFrom"]
    secret = rendered.get("Secret", f"{FULLNAME}-postgresql")
    assert len(base64.b64decode(secret["data"]["password"])) == 32

    # A whole DSN from the user's Secret replaces the built one, and the API key too.
    rendered = render(
        {
            "retrieval": {
                "secretEnv": {
                    "dsn": {"name": "db", "key": "dsn"},
                    "weaviate_api_key": {"name": "wv", "key": "key"},
                }
            }
        }
    )
    config = rendered.get("ConfigMap", f"{FULLNAME}-retrieval")["data"]
    assert "DAERT_RETRIEVAL_DSN" not in config
    env = {
        e["name"]: e
        for e in rendered.get("Deployment", f"{FULLNAME}-retrieval")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["DAERT_RETRIEVAL_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "dsn"}
    assert env["DAERT_RETRIEVAL_WEAVIATE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "wv",
        "key": "key",
    }
    assert "PGPASSWORD" not in env


def test_existing_secrets_are_not_generated() -> None:
    rendered = render(
        {
            **ALL_ON,
            "postgresql": {"auth": {"existingSecret": "pg-creds", "passwordKey": "pw"}},
            "redis": {"auth": {"existingSecret": "redis-creds"}},
        }
    )
    assert not rendered.of("Secret")
    env = {
        e["name"]: e
        for e in rendered.get("Deployment", f"{FULLNAME}-generation")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["DAERT_GENERATION_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-creds",
        "key": "password",
    }
    pg = rendered.get("StatefulSet", f"{FULLNAME}-postgresql")["spec"]["template"]["spec"]
    pg_env = {e["name"]: e for e in pg["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "pg-creds",
        "key": "pw",
    }
