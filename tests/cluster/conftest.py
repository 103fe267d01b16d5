"""The chart on a real Kubernetes control plane (daert.local.kube: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, nodes simulated by kwok), one per test session.

`releases` installs charts/daert with `daert deploy` four times at once, each in its own
namespace enforcing the restricted Pod Security Standard: the default, dev and prod values,
and the default values with the model-preload hook. The prod namespace first sees the
install fail for want of the ServiceMonitor CRD, then succeed once it exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from daert.local.kube import LocalCluster

from tests.helpers import REPO, TOOLS

CHART = REPO / "charts" / "daert"
RELEASE = "daert"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# Long enough for a busy two-core machine; the cluster normally settles in seconds.
HELM_TIMEOUT = "5m"

PROFILES: dict[str, list[str]] = {
    "default": [],
    "dev": ["-f", str(CHART / "values-dev.yaml")],
    "prod": ["-f", str(CHART / "values-prod.yaml")],
    # An air-gapped install: the models come from an image into a claim the operator made,
    # copied by the pre-install hook Job.
    "preload": [
        "--set",
        "modelCache.type=pvc,modelCache.pvc.existingClaim=models,modelPreload.enabled=true",
        "--set",
        "modelPreload.image.repository=registry.example/models,modelPreload.image.tag=1",
    ],
}

# The only monitoring.coreos.com object the chart makes, as a CRD of our own: the Prometheus
# Operator's real one validates more, but a test cluster only needs the kind to exist.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}

# API groups of the kinds the chart makes, for their REST paths.
_CORE_KINDS = {
    "ConfigMap", "Event", "PersistentVolumeClaim", "Pod", "Secret", "Service", "ServiceAccount"
}  # fmt: skip


def api_path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    """The REST path of a namespaced object (or, without `name`, of its collection)."""
    plural = kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s"
    root = "/api/v1" if kind in _CORE_KINDS else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def daert(
    *args: str, env: dict[str, str], timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    """`python -m daert ...` run to the end; never a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "daert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def helm(*args: str, env: dict[str, str]) -> str:
    """The helm binary itself (for what daert has no command for: history, rollback, get)."""
    done = subprocess.run(
        [str(TOOLS / "helm"), *args], capture_output=True, text=True, env=env, timeout=400
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Release:
    """A release of charts/daert in its own namespace, as `daert deploy` installed it."""

    profile: str
    namespace: str
    install: subprocess.CompletedProcess[str]
    env: dict[str, str]
    cluster: LocalCluster

    def manifest(self) -> list[dict[str, Any]]:
        """The objects of the release's current revision, as helm rendered them."""
        text = helm("get", "manifest", RELEASE, "-n", self.namespace, env=self.env)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def stored(self, kind: str, name: str, api_version: str = "v1") -> dict[str, Any]:
        """The object as the API server stores it."""
        return self.cluster.get(api_path(api_version, kind, self.namespace, name))

    def items(self, api_version: str, kind: str, **params: str) -> list[dict[str, Any]]:
        """Every object of a kind in the namespace (params: labelSelector, ...)."""
        reply = self.cluster.client.get(api_path(api_version, kind, self.namespace), params=params)
        reply.raise_for_status()
        items: list[dict[str, Any]] = reply.json()["items"]
        return items

    def history(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = json.loads(
            helm("history", RELEASE, "-n", self.namespace, "-o", "json", env=self.env)
        )
        return entries

    def secret_data(self, name: str) -> dict[str, str]:
        data: dict[str, str] = self.stored("Secret", name)["data"]
        return data


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One local cluster for the session, with the RuntimeClass the chart's sandbox asks for
    in the default and prod values (gVisor; nothing runs, so its handler is never called)."""
    with LocalCluster(tmp_path_factory.mktemp("kube"), runtime_classes=["gvisor"]) as local:
        yield local


@pytest.fixture(scope="session")
def helm_env(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for helm and daert: the cluster's kubeconfig, helm's state in tmp."""
    home = tmp_path_factory.mktemp("helm")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
    environ.pop("DAERT_HELM", None)
    return environ | {
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="session")
def new_namespace(cluster: LocalCluster) -> Callable[[str], str]:
    """Create a namespace enforcing the restricted Pod Security Standard; returns its name."""

    def create(name: str) -> str:
        cluster.create_namespace(name, RESTRICTED)
        return name

    return create


def deploy_command(namespace: str, *values: str) -> list[str]:
    return ["deploy", "-n", namespace, *values, "--wait", "--timeout", HELM_TIMEOUT]


@dataclass
class ProdWithoutCrd:
    """The first prod install, before the ServiceMonitor CRD existed."""

    done: subprocess.CompletedProcess[str]
    objects_after: list[dict[str, Any]]


@pytest.fixture(scope="session")
def prod_without_crd(
    cluster: LocalCluster, helm_env: dict[str, str], new_namespace: Callable[[str], str]
) -> ProdWithoutCrd:
    """Install the prod values where no ServiceMonitor CRD exists (and then create it)."""
    namespace = new_namespace("chart-prod")
    done = daert(*deploy_command(namespace, *PROFILES["prod"]), env=helm_env)
    result = ProdWithoutCrd(done, everything_in(cluster, namespace))
    cluster.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", SERVICE_MONITOR_CRD)
    cluster.wait_for(crd_established(cluster), "the ServiceMonitor CRD established")
    return result


@pytest.fixture(scope="session")
def releases(
    cluster: LocalCluster,
    helm_env: dict[str, str],
    new_namespace: Callable[[str], str],
    prod_without_crd: ProdWithoutCrd,
) -> dict[str, Release]:
    """Every profile installed with `daert deploy --wait`, the four at once (prod where the
    first attempt failed, now that the CRD exists)."""
    namespaces = {
        profile: "chart-prod" if profile == "prod" else new_namespace(f"chart-{profile}")
        for profile in PROFILES
    }
    cluster.create(
        api_path("v1", "PersistentVolumeClaim", namespaces["preload"]),
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )
    started = {
        profile: subprocess.Popen(
            [sys.executable, "-m", "daert", *deploy_command(namespaces[profile], *values)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=helm_env,
            cwd=REPO,
        )
        for profile, values in PROFILES.items()
    }
    installed = {}
    for profile, process in started.items():
        stdout, stderr = process.communicate(timeout=400)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert "Traceback" not in stderr, stderr
        installed[profile] = Release(profile, namespaces[profile], done, helm_env, cluster)
    return installed


def crd_established(cluster: LocalCluster) -> Callable[[], bool]:
    def established() -> bool:
        crd = cluster.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
            "servicemonitors.monitoring.coreos.com"
        )
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    return established


# The namespaced kinds a release of the chart can leave behind, and the ones every
# namespace has by itself (the default ServiceAccount, the kube-root-ca.crt ConfigMap).
NAMESPACED_KINDS = [
    ("v1", "Pod"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "ReplicaSet"),
    ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
]
NAMESPACE_OWN = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt")}


def everything_in(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    """Every object of NAMESPACED_KINDS (and ServiceMonitors, when the kind exists) in
    the namespace, but the namespace's own."""
    kinds = list(NAMESPACED_KINDS)
    try:
        crd_established(cluster)()
        kinds.append(("monitoring.coreos.com/v1", "ServiceMonitor"))
    except httpx.HTTPStatusError:
        pass
    found = []
    for api_version, kind in kinds:
        for item in cluster.get(api_path(api_version, kind, namespace))["items"]:
            item["kind"] = kind
            if (kind, item["metadata"]["name"]) not in NAMESPACE_OWN:
                found.append(item)
    return found
