"""The `helm test` Pod (its script run here against stub grpcurl/wget), NOTES.txt and the data
stores. The daert-full umbrella chart: test_full_chart.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import (
    ALL_ON,
    DEFAULT_ON,
    FULLNAME,
    OWN_SERVERS,
    PROFILES,
    SERVICES,
    copy_chart,
    render,
    run_helm,
)

# --- helm test ---------------------------------------------------------------------------------


def health_pod(values: dict[str, Any]) -> dict[str, Any]:
    rendered = render(values)
    (pod,) = [d for d in rendered.of("Pod") if d["metadata"]["name"] == f"{FULLNAME}-test-health"]
    return pod


def test_helm_test_hook_checks_every_enabled_service() -> None:
    pod = health_pod(ALL_ON)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "fullstorydev/grpcurl:v1.9.1-alpine"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    script = c["args"][0]
    for name in SERVICES:
        if name == "gateway":
            assert f"http://{FULLNAME}-gateway:8000/healthz" in script
        else:
            port = render(ALL_ON).get("Service", f"{FULLNAME}-{name}")["spec"]["ports"][0]["port"]
            line = f"{FULLNAME}-{name}:{port} grpc.health.v1.Health/Check"
            assert script.count(line) == 1, name
    # The LLM server on its HTTP health path.
    assert script.count(f"wget -q -T 10 -O - http://{FULLNAME}-llm:8090/health") == 1
    script = health_pod(OWN_SERVERS)["spec"]["containers"][0]["args"][0]
    assert "-llm" not in script
    # Only enabled services are checked.
    script = health_pod({"lora": {"enabled": False}})["spec"]["containers"][0]["args"][0]
    grpc_services = [name for name in DEFAULT_ON if name not in ("gateway", "lora")]
    assert script.count("grpc.health.v1.Health/Check") == len(grpc_services)
    assert f"{FULLNAME}-lora" not in script
    assert f"http://{FULLNAME}-gateway:8000/healthz" in script


STUB = """#!/bin/sh
# Stub of {tool}: answers like the real one for the targets in $STUB_DOWN (down) or not.
for arg in "$@"; do
  case " $STUB_DOWN " in *" $arg "*)
    {down}
  esac
done
{up}
"""


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "grpcurl": (
            'echo \'{\n  "status": "NOT_SERVING"\n}\'; exit 0',
            'echo \'{\n  "status": "SERVING"\n}\'',
        ),
        "wget": ('echo "wget: server returned error: HTTP/1.1 503" >&2; exit 1', 'echo "{}"'),
    }
    for tool, (down, up) in tools.items():
        path = bin_dir / tool
        path.write_text(STUB.format(tool=tool, down=down, up=up))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_test_script(stub_bin: Path, down: list[str]) -> subprocess.CompletedProcess[str]:
    script = health_pod({**ALL_ON, "tests": {"attempts": 1}})["spec"]["containers"][0]["args"][0]
    env = {"PATH": f"{stub_bin}:{os.environ['PATH']}", "STUB_DOWN": " ".join(down)}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_helm_test_script_passes_when_all_serve(stub_bin: Path) -> None:
    proc = run_test_script(stub_bin, down=[])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every service and the LLM server.
    assert proc.stdout.count("ok: ") == len(SERVICES) + 1


def test_helm_test_script_fails_on_not_serving(stub_bin: Path) -> None:
    proc = run_test_script(
        stub_bin, down=[f"{FULLNAME}-rerank:50054", f"http://{FULLNAME}-gateway:8000/healthz"]
    )
    assert proc.returncode == 1
    assert f"FAILED: {FULLNAME}-rerank:50054" in proc.stdout
    assert f"FAILED: http://{FULLNAME}-gateway:8000/healthz" in proc.stdout
    assert proc.stdout.count("ok: ") == len(SERVICES) + 1 - 2


def test_helm_test_script_fails_while_the_llm_loads(stub_bin: Path) -> None:
    """llama-server answers /health with 503 until its model is loaded."""
    proc = run_test_script(stub_bin, down=[f"http://{FULLNAME}-llm:8090/health"])
    assert proc.returncode == 1
    assert f"FAILED: http://{FULLNAME}-llm:8090/health" in proc.stdout
    assert proc.stdout.count("ok: ") == len(SERVICES)


# --- NOTES.txt ---------------------------------------------------------------------------------


def render_notes(tmp_path: Path, values_files: list[Path]) -> str:
    """helm template does not print NOTES.txt: a copy of the chart gets a ConfigMap that
    includes it, which is rendered instead."""
    chart = copy_chart(tmp_path)
    (chart / "templates" / "zz-notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "daert/templates/NOTES.txt" . | quote }}\n'
    )
    args = [
        "template",
        "rel",
        str(chart),
        "-n",
        "ns",
        "--show-only",
        "templates/zz-notes-probe.yaml",
    ]
    for path in values_files:
        args += ["-f", str(path)]
    doc = yaml.safe_load(run_helm(*args))
    notes: str = doc["data"]["notes"]
    return notes


def test_notes_tell_how_to_reach_each_enabled_service(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, [])
    for name in DEFAULT_ON:
        port = render().get("Service", f"{FULLNAME}-{name}")["spec"]["ports"][0]["port"]
        assert f"kubectl -n ns port-forward svc/{FULLNAME}-{name} {port}:{port}" in notes
        if name != "gateway":
            assert f"grpcurl -plaintext localhost:{port} grpc.health.v1.Health/Check" in notes
    assert "curl http://localhost:8000/healthz" in notes
    assert f"exec deploy/{FULLNAME}-gateway -- daert keys create --tenant" in notes
    assert "helm test rel -n ns" in notes
    # The LLM server, how to reach it and where its model comes from.
    assert f"kubectl -n ns port-forward svc/{FULLNAME}-llm 8090:8090" in notes
    assert "curl http://localhost:8090/v1/models" in notes
    assert 'model "gemma-3-270m", context 4096 tokens, 2 slots' in notes
    assert "the image ghcr.io/daert/daert-llm-model" in notes
    assert 'The generation service serves it as its one model, "gemma-3-270m"' in notes
    assert "WARNING" not in notes
    # With your own LLM servers and no llm, the NOTES do not mention it.
    own = tmp_path / "own-servers.yaml"
    own.write_text(yaml.safe_dump(OWN_SERVERS))
    notes = render_notes(tmp_path / "own", [own])
    assert "LLM server" not in notes and "-llm" not in notes
    # Without gVisor (the dev profile) the NOTES say that it is not isolation.
    dev = render_notes(tmp_path / "dev", PROFILES["dev"])
    assert "WARNING: sandbox.runtimeClassName is empty" in dev


# --- data stores -------------------------------------------------------------------------------


def test_pgvector_statefulset() -> None:
    rendered = render()
    sts = rendered.get("StatefulSet", f"{FULLNAME}-postgresql")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "pgvector/pgvector:0.8.0-pg16"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[kind]["exec"]["command"][0] == "pg_isready"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[
        "data"
    ] == "/var/lib/postgresql/data"
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert sts["spec"]["serviceName"] == f"{FULLNAME}-postgresql-headless"
    assert rendered.get("Service", f"{FULLNAME}-postgresql-headless")["spec"]["clusterIP"] == "None"
    # The database reaches nothing and is reached only from the release.
    policy = rendered.get("NetworkPolicy", f"{FULLNAME}-postgresql")["spec"]
    assert policy["egress"] == []


def test_redis_runs_only_when_a_service_uses_it() -> None:
    # Generation (its cache), context (rolling summaries), lora (load state) and the gateway
    # (rate limits) use it.
    users = ("generation", "context", "lora", "gateway")
    users_off = {name: {"enabled": False} for name in users}
    assert f"{FULLNAME}-redis" not in render(users_off).names("Deployment")
    assert f"{FULLNAME}-redis" in render({**users_off, "lora": {"enabled": True}}).names(
        "Deployment"
    )
    rendered = render({**users_off, "generation": {"enabled": True}})
    redis = rendered.get("Deployment", f"{FULLNAME}-redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "redis:7.4.2"
    assert "redis-cli" in c["readinessProbe"]["exec"]["command"][-1]
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    # The password is not on the command line.
    assert "$(REDIS_PASSWORD)" not in " ".join(c["args"])
    data = rendered.get("ConfigMap", f"{FULLNAME}-generation")["data"]
    assert data["DAERT_GENERATION_REDIS_URL"] == f"redis://{FULLNAME}-redis:6379/0"
    # PostgreSQL likewise: retrieval, lora and the gateway (its API keys) off, no database.
    db_users_off = {name: {"enabled": False} for name in ("retrieval", "lora", "gateway")}
    assert not render(db_users_off).of("StatefulSet")
