"""What every service gets from the one shared template: image, args, ports, probes,
resources, security, volumes, ServiceAccount, Service, HPA, PDB; and what disabling removes."""

from __future__ import annotations

from typing import Any

import pytest
from daert.runtime.registry import DEFAULT_PORTS, default_metrics_port

from tests.chart.conftest import (
    ALL_ON,
    DEFAULT_ON,
    FULLNAME,
    PROFILES,
    RESTRICTED_CONTAINER,
    SERVICES,
    Rendered,
    render,
)


def ports_of(name: str) -> tuple[int, int]:
    if name == "gateway":
        return 8000, 9000
    return DEFAULT_PORTS[name], default_metrics_port(name)


def container(rendered: Rendered, name: str) -> dict[str, Any]:
    pod = rendered.get("Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["spec"]
    (only,) = pod["containers"]
    return only


def test_the_chart_ports_are_the_registry_ports() -> None:
    """values.yaml's ports cannot drift from daert.runtime.registry."""
    rendered = render(ALL_ON)
    for name in DEFAULT_PORTS:
        config = rendered.get("ConfigMap", f"{FULLNAME}-{name}")["data"]
        prefix = f"DAERT_{name.upper()}_"
        assert config[prefix + "PORT"] == str(DEFAULT_PORTS[name])
        assert config[prefix + "METRICS_PORT"] == str(default_metrics_port(name))


def test_default_install_runs_the_services_that_exist() -> None:
    deployments = render().names("Deployment")
    # The services, the LLM server (llama.cpp) and Redis (generation, context and lora use it).
    assert deployments == {f"{FULLNAME}-{name}" for name in DEFAULT_ON} | {
        f"{FULLNAME}-llm",
        f"{FULLNAME}-redis",
    }
    assert render().names("StatefulSet") == {f"{FULLNAME}-postgresql"}


@pytest.mark.parametrize("profile", ["all-on", "all-on-dev", "all-on-prod"])
@pytest.mark.parametrize("name", SERVICES)
def test_every_enabled_service_is_complete(profile: str, name: str) -> None:
    files = {"all-on": [], "all-on-dev": PROFILES["dev"], "all-on-prod": PROFILES["prod"]}[profile]
    rendered = render(ALL_ON, files=files)
    fullname = f"{FULLNAME}-{name}"
    port, metrics_port = ports_of(name)
    deployment = rendered.get("Deployment", fullname)
    pod = deployment["spec"]["template"]["spec"]
    c = container(rendered, name)

    # The image and its one entrypoint: `daert serve <service>`.
    repository = "ghcr.io/daert/daert-sandbox" if name == "sandbox" else "ghcr.io/daert/daert"
    assert c["image"] == f"{repository}:0.1.0"
    assert c["args"] == ["serve", name]
    assert "command" not in c

    # Ports, on the container and the Service.
    port_name = "http" if name == "gateway" else "grpc"
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
        (port_name, port),
        ("metrics", metrics_port),
    }
    service = rendered.get("Service", fullname)
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (port_name, port, port_name),
        ("metrics", metrics_port, "metrics"),
    }
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    # Probes: native gRPC on grpc.health.v1 (the gateway: HTTP), startup generous.
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[kind]
        if name == "gateway":
            assert probe["httpGet"] == {"path": "/healthz", "port": "http"}
        elif kind == "livenessProbe":  # the process answering, not its backends
            assert probe["grpc"] == {"port": port, "service": "liveness"}
        else:
            assert probe["grpc"] == {"port": port}
        assert probe["periodSeconds"] > 0 and probe["failureThreshold"] > 0
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    # Resources: requests for the scheduler, a memory limit.
    assert c["resources"]["requests"]["cpu"]
    assert c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]

    # Pod security: restricted.
    for key, value in RESTRICTED_CONTAINER.items():
        assert c["securityContext"][key] == value, key
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False

    # Writable /tmp and cache on a read-only root filesystem.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    assert mounts["/var/cache/daert"] == "cache"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"] and "emptyDir" in volumes["cache"]

    # Kubernetes waits longer than the server drains.
    config = rendered.get("ConfigMap", fullname)["data"]
    drain = int(config[f"DAERT_{name.upper()}_GRACE_PERIOD_S"])
    assert pod["terminationGracePeriodSeconds"] > drain

    # Its configuration comes from its ConfigMap.
    assert {"configMapRef": {"name": fullname}} in c["envFrom"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    # Its own ServiceAccount, without an API token.
    account = rendered.get("ServiceAccount", fullname)
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == fullname
    assert pod["automountServiceAccountToken"] is False

    # Spread over zones and nodes (off in the one-node dev profile).
    if profile == "all-on-dev":
        assert "topologySpreadConstraints" not in pod
    else:
        keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in pod["topologySpreadConstraints"]:
            assert (
                constraint["labelSelector"]["matchLabels"]
                == deployment["spec"]["selector"]["matchLabels"]
            )

    # A NetworkPolicy and a ServiceMonitor (ALL_ON turns monitoring on).
    assert rendered.get("NetworkPolicy", fullname)
    monitor = rendered.get("ServiceMonitor", fullname)
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("name", SERVICES)
def test_disabling_a_service_removes_all_its_objects(name: str) -> None:
    on = render(ALL_ON, files=PROFILES["prod"])
    values = {**ALL_ON, name: {"enabled": False}}
    off = render(values, files=PROFILES["prod"])
    mine = {(d["kind"], d["metadata"]["name"]) for d in on.component(name)}
    # With everything on and prod: ConfigMap, ServiceAccount, Deployment, Service,
    # NetworkPolicy, HPA, PDB (gateway: no PDB/HPA in prod), ServiceMonitor.
    assert len(mine) >= 6, mine
    assert not off.component(name)
    for doc in off.docs:
        text = str(doc)
        assert f"{FULLNAME}-{name}:" not in text, f"{doc['kind']} still names {name}"
        assert f"DAERT_{name.upper()}_TARGET" not in text
    # Nothing else went away.
    others = {(d["kind"], d["metadata"]["name"]) for d in on.docs} - mine
    left = {(d["kind"], d["metadata"]["name"]) for d in off.docs}
    assert others - left <= {
        ("Secret", f"{FULLNAME}-redis"),
        ("Deployment", f"{FULLNAME}-redis"),
        ("Service", f"{FULLNAME}-redis"),
        ("NetworkPolicy", f"{FULLNAME}-redis"),
        ("Secret", f"{FULLNAME}-postgresql"),
        ("StatefulSet", f"{FULLNAME}-postgresql"),
        ("Service", f"{FULLNAME}-postgresql"),
        ("Service", f"{FULLNAME}-postgresql-headless"),
        ("NetworkPolicy", f"{FULLNAME}-postgresql"),
        ("PersistentVolumeClaim", f"{FULLNAME}-model-cache"),
    }


def test_prod_profile_is_highly_available() -> None:
    rendered = render(files=PROFILES["prod"])
    for name in DEFAULT_ON:
        fullname = f"{FULLNAME}-{name}"
        hpa = rendered.get("HorizontalPodAutoscaler", fullname)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": fullname,
        }
        # The HPA owns the replica count.
        assert "replicas" not in rendered.get("Deployment", fullname)["spec"]
        pdb = rendered.get("PodDisruptionBudget", fullname)
        assert pdb["spec"]["minAvailable"] == 1
        assert (
            pdb["spec"]["selector"]["matchLabels"]
            == rendered.get("Deployment", fullname)["spec"]["selector"]["matchLabels"]
        )


def test_dev_profile_is_one_small_replica_each() -> None:
    rendered = render(files=PROFILES["dev"])
    assert not rendered.of("HorizontalPodAutoscaler")
    assert not rendered.of("PodDisruptionBudget")
    for name in DEFAULT_ON:
        deployment = rendered.get("Deployment", f"{FULLNAME}-{name}")
        assert deployment["spec"]["replicas"] == 1
        memory = container(rendered, name)["resources"]["limits"]["memory"]
        assert memory.endswith("Mi") or int(memory.removesuffix("Gi")) <= 2


def test_image_overrides_and_digest() -> None:
    rendered = render(
        {
            "image": {"repository": "registry.local/daert", "tag": "1.2.3"},
            "rerank": {"image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"}},
        }
    )
    assert container(rendered, "embedding")["image"] == "registry.local/daert:1.2.3"
    rerank = container(rendered, "rerank")
    assert rerank["image"] == "registry.local/daert@sha256:" + "a" * 64
    assert rerank["imagePullPolicy"] == "Always"
    # The sandbox keeps its own repository, with the shared tag.
    assert container(rendered, "sandbox")["image"] == "ghcr.io/daert/daert-sandbox:1.2.3"


def test_autoscaling_needs_a_cpu_request() -> None:
    from tests.chart.conftest import render_error

    error = render_error(
        {"embedding": {"autoscaling": {"enabled": True}, "resources": {"requests": None}}}
    )
    assert "embedding.autoscaling needs embedding.resources.requests.cpu" in error.stderr


def test_model_cache_is_shared_by_embedding_and_rerank() -> None:
    rendered = render(files=PROFILES["prod"])
    (claim,) = rendered.of("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == f"{FULLNAME}-model-cache"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in DEFAULT_ON:
        pod = rendered.get("Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        if name in ("embedding", "rerank"):
            assert (
                volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
                == claim["metadata"]["name"]
            )
            assert mounts["model-cache"]["mountPath"] == "/models"
            assert mounts["model-cache"]["readOnly"] is True
        else:
            assert "model-cache" not in volumes
    # The default: an emptyDir per pod, no claim.
    default = render()
    assert not default.of("PersistentVolumeClaim")
    pod = default.get("Deployment", f"{FULLNAME}-embedding")["spec"]["template"]["spec"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["model-cache"]


@pytest.mark.parametrize("source", ["image", "url"])
def test_model_preload_job_is_a_pre_install_hook(source: str) -> None:
    values = {
        "modelCache": {"type": "pvc", "pvc": {"existingClaim": "models"}},
        "modelPreload": {
            "enabled": True,
            "source": source,
            "image": {"repository": "registry.local/models", "tag": "2025.1"},
            "url": "http://mirror.local/models.tar.gz",
        },
    }
    rendered = render(values)
    job = rendered.get("Job", f"{FULLNAME}-model-preload")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "models"},
    }
    if source == "image":
        assert c["image"] == "registry.local/models:2025.1"
        assert "cp -R /models/. /model-cache/" in c["args"][0]
    else:
        assert c["image"] == "busybox:1.36.1"
        assert {"name": "MODELS_URL", "value": "http://mirror.local/models.tar.gz"} in c["env"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The services use the same claim.
    pod = rendered.get("Deployment", f"{FULLNAME}-embedding")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"]["persistentVolumeClaim"] == {
        "claimName": "models"
    }
    assert not rendered.of("PersistentVolumeClaim")


def test_model_preload_without_an_existing_claim_is_refused() -> None:
    from tests.chart.conftest import render_error

    error = render_error({"modelCache": {"type": "pvc"}, "modelPreload": {"enabled": True}})
    assert "modelPreload needs modelCache.type=pvc and modelCache.pvc.existingClaim" in error.stderr


def test_sandbox_runs_the_process_driver_under_gvisor() -> None:
    rendered = render()
    pod = rendered.get("Deployment", f"{FULLNAME}-sandbox")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "gvisor"
    config = rendered.get("ConfigMap", f"{FULLNAME}-sandbox")["data"]
    assert config["DAERT_SANDBOX_DRIVER"] == "process"
    # Empty is allowed (development), and then there is no runtimeClassName at all.
    pod = render(files=PROFILES["dev"]).get("Deployment", f"{FULLNAME}-sandbox")
    assert "runtimeClassName" not in pod["spec"]["template"]["spec"]
    # Only the sandbox gets a RuntimeClass.
    for name in ("embedding", "retrieval", "rerank"):
        pod = rendered.get("Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["spec"]
        assert "runtimeClassName" not in pod
