"""The daert-full umbrella chart: its dependencies, and the wiring its values set between the
daert chart (rendered here) and the Airflow and Weaviate charts (not rendered: their charts
cannot be fetched offline, so their values are checked against what the daert chart renders,
the Airflow image's Dockerfile and pyproject.toml)."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.conftest import CHART, FULL_CHART, Rendered, render, run_helm
from tests.helpers import REPO

DOCKERFILE = REPO / "docker" / "airflow.Dockerfile"
# What the ingestion DAG's tasks call (daert.clients, DAERT_<SERVICE>_TARGET).
DAG_SERVICES = {"embedding", "retrieval", "rerank", "generation", "context", "sandbox"}
# Pods of the official Airflow chart carry this label (scheduler, workers, api-server, ...).
AIRFLOW_PEER = {"podSelector": {"matchLabels": {"tier": "airflow"}}}


def full_values(*extra: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((FULL_CHART / "values.yaml").read_text())
    for name in extra:
        overlay = yaml.safe_load((FULL_CHART / name).read_text())
        for key, value in overlay.items():
            values[key] = _merge(values.get(key, {}), value)
    return values


def _merge(base: Any, overlay: Any) -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in overlay.items()}}
    return overlay


def dockerfile_args() -> dict[str, str]:
    """ARG defaults of docker/airflow.Dockerfile (global and stage ARGs alike)."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE))
    assert {"AIRFLOW_IMAGE", "AIRFLOW_VERSION"} <= set(args), args
    return args


def airflow_pin() -> str:
    """The version pyproject.toml pins apache-airflow to (its `airflow` extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [
        r for r in project["optional-dependencies"]["airflow"] if r.startswith("apache-airflow==")
    ]
    assert len(pins) == 1, pins
    return pins[0].removeprefix("apache-airflow==")


def airflow_env(values: dict[str, Any]) -> dict[str, str]:
    entries = values["airflow"]["env"]
    env = {e["name"]: e["value"] for e in entries}
    assert len(env) == len(entries), "an env name is listed twice"
    return env


def daert_render(values: dict[str, Any]) -> Rendered:
    return render(values["daert"])


def test_daert_full_depends_on_the_official_charts() -> None:
    chart = yaml.safe_load((FULL_CHART / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert set(deps) == {"daert", "weaviate", "airflow"}
    assert deps["daert"]["repository"] == "file://../daert"
    ours = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert deps["daert"]["version"] == ours["version"]
    assert (FULL_CHART / deps["daert"]["repository"].removeprefix("file://")).resolve() == CHART
    assert deps["weaviate"]["repository"] == "https://weaviate.github.io/weaviate-helm"
    assert deps["weaviate"]["condition"] == "weaviate.enabled"
    assert deps["airflow"]["repository"] == "https://airflow.apache.org"
    assert deps["airflow"]["condition"] == "airflow.enabled"
    # charts/daert itself has no dependencies: it lints and renders offline.
    assert "dependencies" not in ours
    listed = run_helm("dependency", "list", str(FULL_CHART))
    for name in deps:
        assert name in listed


@pytest.mark.parametrize("overlay", [[], ["values-weaviate.yaml"]])
def test_daert_full_values_are_valid_daert_values(overlay: list[str]) -> None:
    values = full_values(*overlay)
    assert set(values) == {"daert", "weaviate", "airflow"}
    assert isinstance(values["weaviate"]["enabled"], bool)
    assert values["airflow"]["enabled"] is True
    # The `daert` section, over the chart's defaults, passes the chart's schema...
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    merged = _merge(defaults, values["daert"])
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(merged)
    # ...and renders.
    rendered = daert_render(values)
    if overlay:
        data = rendered.get("ConfigMap", "daert-retrieval")["data"]
        assert data["DAERT_RETRIEVAL_BACKEND"] == "weaviate"
        assert data["DAERT_RETRIEVAL_WEAVIATE_URL"].startswith("http://weaviate")
        # Retrieval no longer uses PostgreSQL (the LoRA router's adapter registry and the
        # gateway's API keys still do).
        assert "DAERT_RETRIEVAL_DSN" not in data
        egress = rendered.get("NetworkPolicy", "daert-retrieval")["spec"]["egress"]
        assert "postgresql" not in str(egress)
        assert rendered.names("StatefulSet") == {"daert-postgresql"}
        without_users = {
            **values["daert"],
            "lora": {"enabled": False},
            "gateway": {"enabled": False},
        }
        assert not render(without_users).of("StatefulSet")


# --- Airflow ---------------------------------------------------------------------------------


def test_airflow_image_and_version_agree_with_the_dockerfile_and_pyproject() -> None:
    airflow = full_values()["airflow"]
    args = dockerfile_args()
    version = airflow_pin()
    # The base image's Airflow, the pip pin in the image, pyproject.toml and the chart's
    # idea of the version are one version.
    assert args["AIRFLOW_IMAGE"] == f"apache/airflow:{version}-python3.11"
    assert args["AIRFLOW_VERSION"] == version
    assert airflow["airflowVersion"] == version
    assert airflow["defaultAirflowTag"] == version
    # Our image, tagged with the stack's version, the one the Dockerfile's build line names.
    image = airflow["images"]["airflow"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image["tag"] == project["version"]
    assert f"-t {image['repository']}:{image['tag']} ." in DOCKERFILE.read_text()
    assert image["repository"] == "ghcr.io/daert/daert-airflow"


def test_airflow_targets_name_services_the_daert_chart_renders() -> None:
    values = full_values()
    env = airflow_env(values)
    targets = {k: v for k, v in env.items() if k.startswith("DAERT_") and k.endswith("_TARGET")}
    services = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
        for s in daert_render(values).of("Service")
    }
    named = set()
    for name, target in targets.items():
        service = name.removeprefix("DAERT_").removesuffix("_TARGET").lower()
        host, port = target.rsplit(":", 1)
        assert host == f"{values['daert']['fullnameOverride']}-{service}", name
        assert host in services, f"{name}: no Service {host} in the daert chart"
        assert int(port) in services[host], f"{name}: {host} has ports {services[host]}"
        named.add(service)
    # Every service the DAGs call, no more.
    assert named == DAG_SERVICES


def test_airflow_pods_may_call_the_services_they_target() -> None:
    values = full_values()
    rendered = daert_render(values)
    admitted = set()
    for service in DAG_SERVICES:
        policy = rendered.get("NetworkPolicy", f"daert-{service}")["spec"]
        port = rendered.get("Service", f"daert-{service}")["spec"]["ports"][0]["port"]
        (rule,) = [r for r in policy["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
        if AIRFLOW_PEER in rule["from"]:
            admitted.add(service)
    # Every target lets Airflow's pods in; the sandbox because daert-full names them as its
    # clients (the planner's code tasks), not through the release-wide peers.
    assert admitted == DAG_SERVICES
    assert values["daert"]["sandbox"]["networkPolicy"]["clientsFrom"] == [AIRFLOW_PEER]


def test_airflow_runs_the_dags_baked_into_the_image() -> None:
    airflow = full_values()["airflow"]
    # The image copies dags/ to this folder, and Airflow reads it there.
    copies = re.findall(r"^COPY .*\bdags/ (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert copies == ["/opt/airflow/dags/"]
    assert airflow["config"]["core"]["dags_folder"].rstrip("/") == copies[0].rstrip("/")
    assert airflow["dags"]["persistence"]["enabled"] is False
    assert airflow["dags"]["gitSync"]["enabled"] is False
    assert (REPO / "dags").is_dir()


def test_airflow_executor_and_parallelism() -> None:
    airflow = full_values()["airflow"]
    # Tasks run in the scheduler's processes (the DAGs are in its image): no pod per task.
    assert airflow["executor"] == "LocalExecutor"
    core = airflow["config"]["core"]
    parallelism = core["parallelism"]
    assert isinstance(parallelism, int) and parallelism > 1, "mapped batches run in parallel"
    assert core["max_active_tasks_per_dag"] == parallelism
    # The scheduler is sized for it and keeps the task logs on its volume.
    assert airflow["scheduler"]["resources"]["requests"]["memory"]
    assert airflow["workers"]["persistence"]["enabled"] is True


def test_airflow_metadata_database_is_its_own_postgresql() -> None:
    values = full_values()
    airflow = values["airflow"]
    postgresql = airflow["postgresql"]
    assert postgresql["enabled"] is True
    # The chart writes the connection Secret itself, pointing at the bundled server by the name
    # it is given; that name is none of the daert chart's objects (its own PostgreSQL is
    # daert-postgresql).
    assert airflow["data"]["metadataSecretName"] == ""
    name = postgresql["fullnameOverride"]
    assert airflow["data"]["metadataConnection"]["host"] == name
    daert_names = {d["metadata"]["name"] for d in daert_render(values).docs}
    assert "daert-postgresql" in daert_names
    assert not {name, f"{name}-hl"} & daert_names
    # A pinned image that can still be pulled (Bitnami's versioned tags moved to bitnamilegacy).
    image = postgresql["image"]
    assert image["repository"] == "bitnamilegacy/postgresql"
    assert re.fullmatch(r"\d+\.\d+\.\d+-debian-\d+-r\d+", image["tag"]), image["tag"]


def test_airflow_tokenizers_are_optional_and_documented() -> None:
    airflow = full_values()["airflow"]
    # The default model's tokenizer is in the image: nothing to set by default...
    assert "DAERT_INGEST_TOKENIZERS" not in airflow_env(full_values())
    assert airflow["extraEnv"] is None
    assert airflow["volumes"] == [] and airflow["volumeMounts"] == []
    # ...and the values file shows how to add one, with the volume it names.
    lines = (FULL_CHART / "values.yaml").read_text().splitlines()
    block = []
    for line in lines[lines.index("  ##   airflow:") :]:
        if not line.startswith("  ##   "):
            break
        block.append(line.removeprefix("  ##   "))
    doc = yaml.safe_load("\n".join(block))
    (entry,) = yaml.safe_load(doc["airflow"]["extraEnv"])
    assert entry["name"] == "DAERT_INGEST_TOKENIZERS"
    folders = json.loads(entry["value"])
    assert isinstance(folders, dict) and folders
    mounts = {m["mountPath"]: m["name"] for m in doc["airflow"]["volumeMounts"]}
    volumes = {v["name"] for v in doc["airflow"]["volumes"]}
    for folder in folders.values():
        assert mounts[folder] in volumes
    # It names a model the way the daert chart's embedding config does ({name: ...}).
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {"name"} <= set(defaults["embedding"]["config"]["models"][0])


def test_docs_describe_the_airflow_section() -> None:
    docs = (REPO / "docs" / "chart.md").read_text()
    section = docs[docs.index("## Airflow (daert-full)") :]
    for needle in (
        "LocalExecutor",
        "DAERT_INGEST_TOKENIZERS",
        "metadataSecretName",
        "daert_ingest",
        "/api/v2/dags/daert_ingest/dagRuns",
    ):
        assert needle in section, needle
