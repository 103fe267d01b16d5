"""The llm workload: llama.cpp's llama-server with the Gemma 3 270M GGUF, its model from the
model image (an init container) or the model cache, its probes, security, Service and
NetworkPolicy; and its script, run here on a model folder made for the test."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.chart.conftest import (
    FULLNAME,
    OWN_SERVERS,
    PROFILES,
    RELEASE,
    RESTRICTED_CONTAINER,
    Rendered,
    render,
    render_error,
)

LLM = f"{FULLNAME}-llm"
GGUF = "gemma-3-270m-q4_k_m.gguf"


def pod_of(rendered: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.get("Deployment", LLM)["spec"]["template"]["spec"]
    return spec


def server(rendered: Rendered) -> dict[str, Any]:
    (only,) = pod_of(rendered)["containers"]
    assert only["name"] == "llama-server"
    return only


def selector(component: str) -> dict[str, Any]:
    return {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "daert",
                "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/component": component,
            }
        }
    }


def test_llama_server_serves_the_gemma_model_on_8090() -> None:
    rendered = render()
    c = server(rendered)
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-b11312"
    # The image's entrypoint is llama-server: only its arguments are given.
    assert "command" not in c
    assert c["args"] == [
        "--host",
        "0.0.0.0",
        "--port",
        "8090",
        "-m",
        f"/models/{GGUF}",
        "--alias",
        "gemma-3-270m",
        "-c",
        "4096",
        "-np",
        "2",
        "--kv-unified",
        "--jinja",
    ]
    assert c["ports"] == [{"name": "http", "containerPort": 8090, "protocol": "TCP"}]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
        assert c[kind]["periodSeconds"] > 0 and c[kind]["failureThreshold"] > 0
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]

    service = rendered.get("Service", LLM)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {
            "name": "http",
            "port": 8090,
            "targetPort": "http",
            "protocol": "TCP",
            "appProtocol": "http",
        }
    ]
    deployment = rendered.get("Deployment", LLM)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "llm"
    assert deployment["spec"]["replicas"] == 1


def test_the_model_is_copied_from_the_model_image() -> None:
    pod = pod_of(render())
    (init,) = pod["initContainers"]
    assert init["name"] == "copy-model"
    assert init["image"] == "ghcr.io/daert/daert-llm-model:0.1.0"
    assert init["command"] == ["/bin/sh", "-c"]
    assert {e["name"]: e["value"] for e in init["env"]} == {
        "MODEL_DIR": "/models",
        "MODEL_FILE": GGUF,
    }
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/model"}]
    assert init["resources"]["limits"]["memory"]
    mounts = {m["name"]: m for m in server(render())["volumeMounts"]}
    assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["emptyDir"] == {"sizeLimit": "1Gi"}


def test_pod_and_containers_are_restricted() -> None:
    rendered = render()
    pod = pod_of(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod["initContainers"]:
        for key, value in RESTRICTED_CONTAINER.items():
            assert c["securityContext"][key] == value, (c["name"], key)
    # The root filesystem is read-only: /tmp is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in server(rendered)["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["tmp"]
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == LLM
    assert rendered.get("ServiceAccount", LLM)["automountServiceAccountToken"] is False


def test_server_settings_come_from_values() -> None:
    rendered = render(
        {
            "llm": {
                "alias": "tiny",
                "contextSize": 8192,
                "parallel": 4,
                "kvUnified": False,
                "threads": 3,
                "jinja": False,
                "extraArgs": ["--cache-reuse", 256],
                "replicaCount": 2,
                "image": {"digest": "sha256:" + "b" * 64, "pullPolicy": "Always"},
                "model": {
                    "file": "llm/other.gguf",
                    "image": {"repository": "registry.local/models", "tag": "7", "path": "/data"},
                },
            }
        }
    )
    c = server(rendered)
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp@sha256:" + "b" * 64
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == [
        "--host",
        "0.0.0.0",
        "--port",
        "8090",
        "-m",
        "/models/llm/other.gguf",
        "--alias",
        "tiny",
        "-c",
        "8192",
        "-np",
        "4",
        "-t",
        "3",
        "--cache-reuse",
        "256",
    ]
    (init,) = pod_of(rendered)["initContainers"]
    assert init["image"] == "registry.local/models:7"
    assert {e["name"]: e["value"] for e in init["env"]} == {
        "MODEL_DIR": "/data",
        "MODEL_FILE": "llm/other.gguf",
    }
    assert rendered.get("Deployment", LLM)["spec"]["replicas"] == 2


def test_the_model_can_come_from_the_model_cache() -> None:
    values = {"llm": {"model": {"source": "modelCache", "file": "llm/gemma.gguf"}}}
    error = render_error(values)
    assert "llm.model.source=modelCache needs modelCache.type=pvc" in error.stderr

    rendered = render({**values, "modelCache": {"type": "pvc"}})
    pod = pod_of(rendered)
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {
        "claimName": f"{FULLNAME}-model-cache",
        "readOnly": True,
    }
    assert "-m" in server(rendered)["args"]
    assert server(rendered)["args"][server(rendered)["args"].index("-m") + 1] == (
        "/models/llm/gemma.gguf"
    )
    # The chart creates the claim for it even when no Python service mounts the cache.
    alone = render(
        {
            **values,
            "modelCache": {"type": "pvc"},
            "embedding": {"enabled": False},
            "rerank": {"enabled": False},
        }
    )
    assert alone.names("PersistentVolumeClaim") == {f"{FULLNAME}-model-cache"}
    # An existing claim (e.g. filled by modelPreload from the model image) is used as it is.
    existing = render({**values, "modelCache": {"type": "pvc", "pvc": {"existingClaim": "models"}}})
    volumes = {v["name"]: v for v in pod_of(existing)["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
    assert not existing.of("PersistentVolumeClaim")


def test_network_policy_admits_only_its_callers_and_allows_no_egress() -> None:
    rendered = render({"generation": {"enabled": True}, "context": {"enabled": True}})
    spec = rendered.get("NetworkPolicy", LLM)["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "llm"
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [
        {
            "from": [selector("generation"), selector("context"), selector("test")],
            "ports": [{"port": 8090, "protocol": "TCP"}],
        }
    ]
    assert spec["egress"] == []


def test_network_policy_never_admits_everyone() -> None:
    """A rule without peers admits every pod: with no caller on, there is no rule at all."""
    values = {
        "generation": {"enabled": False},
        "context": {"enabled": False},
        "tests": {"enabled": False},
    }
    spec = render(values).get("NetworkPolicy", LLM)["spec"]
    assert spec["ingress"] == []
    extra = [{"from": [{"namespaceSelector": {"matchLabels": {"name": "apps"}}}]}]
    spec = render({**values, "llm": {"networkPolicy": {"extraIngress": extra}}}).get(
        "NetworkPolicy", LLM
    )["spec"]
    assert spec["ingress"] == extra
    # Only the callers that are on are admitted.
    spec = render({**values, "generation": {"enabled": True}}).get("NetworkPolicy", LLM)["spec"]
    assert spec["ingress"][0]["from"] == [selector("generation")]


def test_disabled_llm_leaves_nothing_behind() -> None:
    rendered = render(OWN_SERVERS)
    assert not rendered.component("llm")
    for doc in rendered.docs:
        assert LLM not in str(doc), f"{doc['kind']}/{doc['metadata']['name']} names the llm"


def test_pod_disruption_budget() -> None:
    assert "PodDisruptionBudget" not in {d["kind"] for d in render().component("llm")}
    pdb = render({"llm": {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}}).get(
        "PodDisruptionBudget", LLM
    )
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "llm"


# --- the init container's script, run here ----------------------------------------------------


def run_copy_script(tmp_path: Path, model_dir: Path, file: str) -> subprocess.CompletedProcess[str]:
    (init,) = pod_of(render())["initContainers"]
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    # The script writes to the emptyDir's mount point; here that is a folder of the test's.
    script = init["args"][0].replace('"/model/', f'"{target}/')
    assert "/model/" not in script
    env = {"PATH": "/usr/bin:/bin", "MODEL_DIR": str(model_dir), "MODEL_FILE": file}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "image-models"
    folder.mkdir()
    data = b"GGUF" + bytes(range(256)) * 64
    (folder / GGUF).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (folder / f"{GGUF}.sha256").write_text(f"{digest}  {GGUF}\n")
    return folder


def test_copy_script_copies_a_checked_model(tmp_path: Path, model_dir: Path) -> None:
    proc = run_copy_script(tmp_path, model_dir, GGUF)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copied = tmp_path / "target" / GGUF
    assert copied.read_bytes() == (model_dir / GGUF).read_bytes()
    assert not (tmp_path / "target" / f"{GGUF}.partial").exists()
    # Run again (a pod restart keeps the emptyDir): still fine.
    assert run_copy_script(tmp_path, model_dir, GGUF).returncode == 0


def test_copy_script_refuses_a_corrupt_model(tmp_path: Path, model_dir: Path) -> None:
    with (model_dir / GGUF).open("r+b") as f:
        f.seek(10)
        f.write(b"\x00\xff")
    proc = run_copy_script(tmp_path, model_dir, GGUF)
    assert proc.returncode != 0
    assert not (tmp_path / "target" / GGUF).exists()


def test_copy_script_without_a_checksum_and_in_a_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "image-models"
    (folder / "llm").mkdir(parents=True)
    (folder / "llm" / "m.gguf").write_bytes(b"GGUF model")
    proc = run_copy_script(tmp_path, folder, "llm/m.gguf")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "target" / "llm" / "m.gguf").read_bytes() == b"GGUF model"
    # A missing model fails the init container (and so the pod), not llama-server later.
    assert run_copy_script(tmp_path, folder, "llm/absent.gguf").returncode != 0


# --- the schema refuses bad llm values -------------------------------------------------------

BAD_LLM_VALUES = [
    (["llm.model.source=s3"], "/llm/model/source", "must be one of"),
    (["llm.contextSize=0"], "/llm/contextSize", "minimum"),
    (["llm.parallel=0"], "/llm/parallel", "minimum"),
    (["llm.threads=-1"], "/llm/threads", "minimum"),
    (["llm.port=70000"], "/llm/port", "maximum"),
    (["llm.image.digest=sha256:xyz"], "/llm/image/digest", "does not match pattern"),
    (["llm.model.file=/models/x.gguf"], "/llm/model/file", "does not match pattern"),
    (["llm.model.file=model.bin"], "/llm/model/file", "does not match pattern"),
    (["llm.model.file=../x.gguf"], "/llm/model/file", "not"),
    (["llm.alias=has space"], "/llm/alias", "does not match pattern"),
    (["llm.replicas=2"], "/llm", "additional properties 'replicas' not allowed"),
    (["llm.networkPolicy.extraEgress[0].to=x"], "/llm/networkPolicy", "'extraEgress' not allowed"),
]


@pytest.mark.parametrize(
    ("sets", "where", "message"), BAD_LLM_VALUES, ids=[b[0][0] for b in BAD_LLM_VALUES]
)
def test_schema_refuses_bad_llm_values(sets: list[str], where: str, message: str) -> None:
    error = render_error(sets=sets)
    assert "values don't meet the specifications of the schema" in error.stderr
    assert f"at '{where}'" in error.stderr, error.stderr
    assert message in error.stderr, error.stderr


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_runs_the_llm(profile: str) -> None:
    rendered = render(files=PROFILES[profile])
    c = server(rendered)
    assert c["image"].startswith("ghcr.io/ggml-org/llama.cpp:server-b")
    assert c["resources"]["limits"]["memory"]


# --- generation and context use it while their own settings are unset ------------------------


def config_of(rendered: Rendered, name: str) -> dict[str, str]:
    data: dict[str, str] = rendered.get("ConfigMap", f"{FULLNAME}-{name}")["data"]
    return data


def load(data: dict[str, str], settings_cls: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    import os

    from daert.runtime.settings import load_settings

    for key in list(os.environ):
        if key.startswith("DAERT_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    return load_settings(settings_cls)


def llm_egress(rendered: Rendered, name: str) -> list[dict[str, Any]]:
    spec = rendered.get("NetworkPolicy", f"{FULLNAME}-{name}")["spec"]
    return [rule for rule in spec["egress"] if selector("llm") in rule.get("to", [])]


def test_generation_serves_the_llm_when_no_models_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daert.generation.config import GenerationSettings

    data = config_of(render(), "generation")
    assert json.loads(data["DAERT_GENERATION_MODELS"]) == [
        {
            "name": "gemma-3-270m",
            "backend": "openai",
            "url": f"http://{LLM}:8090",
            "upstream_model": "gemma-3-270m",
            "context_length": 4096,
        }
    ]
    settings = load(data, GenerationSettings, monkeypatch)
    (model,) = settings.models
    assert (model.name, model.backend, model.url) == (
        "gemma-3-270m",
        "openai",
        f"http://{LLM}:8090",
    )
    assert model.upstream_name == "gemma-3-270m" and model.context_length == 4096


def test_the_generated_model_follows_the_llm_values() -> None:
    values = {"llm": {"alias": "tiny", "contextSize": 8192, "port": 8091}}
    (model,) = json.loads(config_of(render(values), "generation")["DAERT_GENERATION_MODELS"])
    assert model["name"] == model["upstream_model"] == "tiny"
    assert model["url"] == f"http://{LLM}:8091"
    assert model["context_length"] == 8192
    # Without one shared KV cache each slot has its share of the context.
    values = {"llm": {"kvUnified": False, "contextSize": 8192, "parallel": 4}}
    (model,) = json.loads(config_of(render(values), "generation")["DAERT_GENERATION_MODELS"])
    assert model["context_length"] == 2048


def test_user_models_are_used_unchanged() -> None:
    models = [
        {"name": "llama", "backend": "openai", "url": "http://vllm.llm:8000", "adapters": "router"},
        {"name": "small", "backend": "ollama", "url": "http://ollama:11434", "keep_alive": "5m"},
    ]
    for llm_on in (True, False):
        values: dict[str, Any] = {**OWN_SERVERS, "llm": {"enabled": llm_on}}
        values["generation"] = {"config": {"models": models}}
        rendered = render(values)
        assert json.loads(config_of(rendered, "generation")["DAERT_GENERATION_MODELS"]) == models
        # The llm pods are reachable only while the llm runs.
        assert bool(llm_egress(rendered, "generation")) is llm_on
    # Models from a Secret are the user's too: the chart sets none.
    values = {**OWN_SERVERS, "generation": {"secretEnv": {"models": {"name": "m", "key": "k"}}}}
    assert "DAERT_GENERATION_MODELS" not in config_of(render(values), "generation")


def test_without_models_or_llm_the_chart_says_what_to_set() -> None:
    error = render_error({"llm": {"enabled": False}})
    assert "generation.config.models is not set and llm.enabled is false" in error.stderr
    assert "list your LLM servers in generation.config.models" in error.stderr
    # Context likewise needs tokenizers once there is no llm to count with.
    error = render_error({"llm": {"enabled": False}, "generation": OWN_SERVERS["generation"]})
    assert "context.config.tokenizers is not set and llm.enabled is false" in error.stderr
    # Neither is asked for when its service is off.
    values = {
        "llm": {"enabled": False},
        "generation": {"enabled": False},
        "context": {"enabled": False},
    }
    assert not render(values).component("generation")


def test_context_counts_tokens_with_the_llm_and_summarizes_through_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daert.context.config import ContextSettings

    rendered = render()
    data = config_of(rendered, "context")
    assert json.loads(data["DAERT_CONTEXT_TOKENIZERS"]) == [
        {"name": "gemma-3-270m", "kind": "llama_cpp", "url": f"http://{LLM}:8090"}
    ]
    assert data["DAERT_CONTEXT_REDIS_URL"] == f"redis://{FULLNAME}-redis:6379/0"
    assert data["DAERT_CONTEXT_SUMMARY_MODEL"] == ""
    assert data["DAERT_CONTEXT_KEEP_LAST_MESSAGES"] == "8"
    assert data["DAERT_CONTEXT_SUMMARY_TTL_S"] == "604800"
    assert data["DAERT_GENERATION_TARGET"] == f"{FULLNAME}-generation:50051"
    assert data["DAERT_EMBEDDING_TARGET"] == f"{FULLNAME}-embedding:50052"
    deployment = rendered.get("Deployment", f"{FULLNAME}-context")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DAERT_CONTEXT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-redis",
        "key": "password",
    }
    settings = load(data, ContextSettings, monkeypatch)
    (tokenizer,) = settings.tokenizers
    assert (tokenizer.kind, tokenizer.url) == ("llama_cpp", f"http://{LLM}:8090")
    assert settings.summary_model == "" and settings.keep_last_messages == 8
    # The user's tokenizers and settings are used as given.
    tokenizers = OWN_SERVERS["context"]["config"]["tokenizers"]
    values = {"context": {"config": {"tokenizers": tokenizers, "summary_model": "llama"}}}
    data = config_of(render(values), "context")
    assert json.loads(data["DAERT_CONTEXT_TOKENIZERS"]) == tokenizers
    assert data["DAERT_CONTEXT_SUMMARY_MODEL"] == "llama"


@pytest.mark.parametrize("name", ["generation", "context"])
def test_callers_may_reach_the_llm_pods(name: str) -> None:
    assert llm_egress(render(), name) == [
        {"to": [selector("llm")], "ports": [{"port": 8090, "protocol": "TCP"}]}
    ]
    assert not llm_egress(render(OWN_SERVERS), name)
    # Nobody else may.
    rendered = render({"gateway": {"enabled": True}})
    for other in ("embedding", "retrieval", "rerank", "lora", "gateway"):
        assert not llm_egress(rendered, other), other


def test_dev_runs_a_small_llm() -> None:
    rendered = render(files=PROFILES["dev"])
    c = server(rendered)
    assert c["resources"]["limits"]["memory"] == "768Mi"
    assert c["args"][c["args"].index("-t") + 1] == "2"
    assert rendered.get("Deployment", LLM)["spec"]["replicas"] == 1
    assert "PodDisruptionBudget" not in {d["kind"] for d in rendered.component("llm")}
    assert "DAERT_GENERATION_MODELS" in config_of(rendered, "generation")


def test_prod_runs_the_llm_highly_available_or_your_own_servers() -> None:
    rendered = render(files=PROFILES["prod"])
    assert rendered.get("Deployment", LLM)["spec"]["replicas"] == 2
    pdb = rendered.get("PodDisruptionBudget", LLM)
    assert pdb["spec"]["minAvailable"] == 1
    (model,) = json.loads(config_of(rendered, "generation")["DAERT_GENERATION_MODELS"])
    assert model["url"] == f"http://{LLM}:8090"
    # With your own servers and the llm off, the prod profile renders without it.
    own = render(OWN_SERVERS, files=PROFILES["prod"])
    assert not own.component("llm")
    assert (
        json.loads(config_of(own, "generation")["DAERT_GENERATION_MODELS"])
        == (OWN_SERVERS["generation"]["config"]["models"])
    )
