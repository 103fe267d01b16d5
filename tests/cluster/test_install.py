"""`daert deploy` installs charts/daert on a real API server: the default, dev and prod
values and the model-preload hook, each into a namespace enforcing the restricted Pod
Security Standard. What the server stores is checked against what the chart renders."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from daert.local.kube import LocalCluster

from tests.cluster.conftest import (
    PROFILES,
    RELEASE,
    ProdWithoutCrd,
    Release,
    api_path,
    daert,
    helm,
)

pytestmark = pytest.mark.timeout(600)


def contains(stored: Any, rendered: Any) -> bool:
    """Whether `stored` holds everything `rendered` says (the server adds its defaults)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(
            key in stored and contains(stored[key], value) for key, value in rendered.items()
        )
    if isinstance(rendered, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(rendered)
            and all(map(contains, stored, rendered))
        )
    return bool(stored == rendered)


def of_kind(release: Release, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in release.manifest() if doc["kind"] == kind]


def stored_twin(release: Release, doc: dict[str, Any]) -> dict[str, Any]:
    return release.stored(doc["kind"], doc["metadata"]["name"], doc["apiVersion"])


@pytest.mark.parametrize("profile", list(PROFILES))
def test_install_waits_for_everything_and_prints_the_notes(
    releases: dict[str, Release], profile: str
) -> None:
    release = releases[profile]
    done = release.install
    assert done.returncode == 0, done.stderr
    assert "(waiting for readiness)" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        f"release   {RELEASE} (namespace {release.namespace})",
        "revision  1",
        "status    deployed",
    ]
    assert f"is installed as release {RELEASE} in namespace {release.namespace}." in done.stdout
    assert f"kubectl -n {release.namespace} port-forward svc/daert-embedding" in done.stdout


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_object_is_accepted_and_stored(releases: dict[str, Release], profile: str) -> None:
    release = releases[profile]
    manifest = release.manifest()
    assert len(manifest) > 30
    for doc in manifest:
        stored = stored_twin(release, doc)
        assert stored["metadata"]["labels"] == doc["metadata"]["labels"], doc["metadata"]["name"]
        assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_workload_is_ready_and_every_pod_admitted(
    releases: dict[str, Release], profile: str
) -> None:
    """--wait returned, so helm saw them Ready; here is what the controllers made of them:
    pods created by their ReplicaSets and StatefulSets (none refused by Pod Security, which
    would leave a FailedCreate event), scheduled and running on the simulated nodes."""
    release = releases[profile]
    workloads = [d for d in release.manifest() if d["kind"] in ("Deployment", "StatefulSet")]
    for doc in workloads:
        stored = stored_twin(release, doc)
        replicas = stored["spec"]["replicas"]
        assert replicas >= 1
        assert stored["status"].get("readyReplicas") == replicas, doc["metadata"]["name"]
    pods = release.items("v1", "Pod")
    assert len(pods) >= len(workloads)
    for pod in pods:
        name = pod["metadata"]["name"]
        assert pod["status"]["phase"] == "Running", name
        assert pod["spec"]["nodeName"].startswith("kwok-node-"), name
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True", name
    reasons = {event["reason"] for event in release.items("v1", "Event")}
    assert "FailedCreate" not in reasons


def test_pod_security_is_enforced_in_the_release_namespaces(
    releases: dict[str, Release], cluster: LocalCluster
) -> None:
    """The control: a pod the restricted standard forbids is refused where the chart's pods
    were admitted."""
    namespace = releases["default"].namespace
    reply = cluster.client.post(
        api_path("v1", "Pod", namespace),
        json={
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "unconfined"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        },
    )
    assert reply.status_code == 403
    message = reply.json()["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "allowPrivilegeEscalation != false" in message
    assert "runAsNonRoot != true" in message


def test_the_preload_hook_job_completes_before_the_services_start(
    releases: dict[str, Release],
) -> None:
    release = releases["preload"]
    status = json.loads(
        helm("status", RELEASE, "-n", release.namespace, "-o", "json", env=release.env)
    )
    # The other hook is `helm test`'s Pod, which has not run.
    (hook,) = [h for h in status["hooks"] if h["kind"] == "Job"]
    assert hook["name"] == "daert-model-preload"
    assert hook["events"] == ["pre-install", "pre-upgrade"]
    assert hook["last_run"]["phase"] == "Succeeded"
    # The Job controller ran it: its pod was created on a node and the Job completed ...
    events = release.items("v1", "Event", fieldSelector="involvedObject.name=daert-model-preload")
    assert {"SuccessfulCreate", "Completed"} <= {e["reason"] for e in events}
    # ... and, succeeded, it was deleted (hook-delete-policy hook-succeeded).
    with pytest.raises(httpx.HTTPStatusError) as missing:
        release.stored("Job", "daert-model-preload", "batch/v1")
    assert missing.value.response.status_code == 404
    # Before any of the chart's own objects existed.
    created = [d["metadata"]["creationTimestamp"] for d in release.items("apps/v1", "Deployment")]
    assert hook["last_run"]["completed_at"][:19] <= min(created).rstrip("Z")


def test_status_shows_the_release_and_its_live_workloads_and_pods(
    releases: dict[str, Release],
) -> None:
    """The real `helm status --show-resources` lists each workload's pods as a PodList,
    which the canned JSON had as Pods (a KeyError on 'name')."""
    release = releases["dev"]
    done = daert("status", "-n", release.namespace, env=release.env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        f"release   {RELEASE} (namespace {release.namespace})",
        "revision  1",
        "status    deployed",
    ]
    workloads = lines[lines.index("workloads:") + 1 : lines.index("pods:")]
    expected = sorted(
        f"{d['kind']}/{d['metadata']['name']}"
        for d in release.manifest()
        if d["kind"] in ("Deployment", "StatefulSet")
    )
    assert [line.split() for line in workloads] == [[w, "ready", "1/1"] for w in expected]
    pods = lines[lines.index("pods:") + 1 :]
    names = sorted(p["metadata"]["name"] for p in release.items("v1", "Pod"))
    assert [line.split()[0] for line in pods] == names
    assert all(line.split()[1:] == ["Running", "ready", "1/1", "restarts", "0"] for line in pods)


# ------------------------------------------------------------------------------ stored objects


def test_network_policies_as_stored(releases: dict[str, Release]) -> None:
    release = releases["prod"]
    policies = of_kind(release, "NetworkPolicy")
    assert len(policies) >= 8
    for doc in policies:
        stored = stored_twin(release, doc)["spec"]
        rendered = doc["spec"]
        assert stored["policyTypes"] == ["Ingress", "Egress"]
        if rendered["egress"] == []:
            # The server drops an empty list: no egress rule with Egress in policyTypes is
            # what denies all egress (the sandbox's, the data stores').
            assert "egress" not in stored, doc["metadata"]["name"]
            rendered = {k: v for k, v in rendered.items() if k != "egress"}
        assert contains(stored, rendered), doc["metadata"]["name"]
    sandbox = release.stored("NetworkPolicy", "daert-sandbox", "networking.k8s.io/v1")["spec"]
    assert "egress" not in sandbox
    assert sandbox["ingress"] == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/name": "daert",
                        }
                    }
                }
            ],
            "ports": [{"port": 50055, "protocol": "TCP"}],
        }
    ]


def test_autoscalers_as_stored_and_acted_on(
    releases: dict[str, Release], cluster: LocalCluster
) -> None:
    """The HPA controller scales each Deployment (rendered without replicas, so created with
    one) up to minReplicas; with no metrics API it can go no further, and says so."""
    release = releases["prod"]
    autoscalers = of_kind(release, "HorizontalPodAutoscaler")
    assert len(autoscalers) >= 6
    for doc in autoscalers:
        name = doc["metadata"]["name"]
        stored = stored_twin(release, doc)
        assert contains(stored["spec"], doc["spec"]), name
        target = doc["spec"]["scaleTargetRef"]["name"]
        minimum = doc["spec"]["minReplicas"]
        path = api_path("apps/v1", "Deployment", release.namespace, target)
        cluster.wait_for(
            lambda path=path, minimum=minimum: (
                cluster.get(path)["status"].get("readyReplicas") == minimum
            ),
            f"{target} scaled to {minimum} by its HPA",
        )
        conditions = {c["type"]: c for c in release.stored(doc["kind"], name, "autoscaling/v2")
                      ["status"]["conditions"]}  # fmt: skip
        assert conditions["AbleToScale"]["status"] == "True"
        assert conditions["ScalingActive"]["reason"] == "FailedGetResourceMetric"


def test_disruption_budgets_as_stored_and_computed(
    releases: dict[str, Release], cluster: LocalCluster
) -> None:
    release = releases["prod"]
    budgets = of_kind(release, "PodDisruptionBudget")
    assert len(budgets) >= 7
    for doc in budgets:
        name = doc["metadata"]["name"]
        path = api_path("policy/v1", "PodDisruptionBudget", release.namespace, name)
        assert contains(cluster.get(path)["spec"], doc["spec"]), name
        assert doc["spec"]["minAvailable"] == 1

        def settled(path: str = path) -> bool:
            # The disruption controller's count, once the HPA has scaled to two replicas.
            status = cluster.get(path)["status"]
            return bool(
                status.get("expectedPods") == 2
                and status.get("currentHealthy") == 2
                and status.get("desiredHealthy") == 1
                and status.get("disruptionsAllowed") == 1
            )

        cluster.wait_for(settled, f"{name}: two healthy pods, one disruption allowed")


@pytest.mark.parametrize("profile", ["default", "prod"])
def test_service_accounts_and_their_pods_carry_no_token(
    releases: dict[str, Release], profile: str
) -> None:
    release = releases[profile]
    accounts = of_kind(release, "ServiceAccount")
    assert accounts
    for doc in accounts:
        assert stored_twin(release, doc)["automountServiceAccountToken"] is False
    names = {doc["metadata"]["name"] for doc in accounts}
    for pod in release.items("v1", "Pod"):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, pod["metadata"]["name"]
        # The ServiceAccount admission plugin mounted no API token.
        assert not any(v["name"].startswith("kube-api-access") for v in spec.get("volumes", []))
        assert spec["serviceAccountName"] in names | {"default"}


# ------------------------------------------------------------------------------ ServiceMonitor


def test_without_the_servicemonitor_crd_prod_is_refused_and_nothing_is_created(
    prod_without_crd: ProdWithoutCrd,
) -> None:
    """values-prod.yaml needs the monitoring.coreos.com CRDs (its header says so): without
    them helm refuses the whole release, naming the kind, before creating anything."""
    done = prod_without_crd.done
    assert done.returncode == 1
    assert "helm failed: Error: unable to build kubernetes objects from release manifest" in (
        done.stderr
    )
    assert 'no matches for kind "ServiceMonitor" in version "monitoring.coreos.com/v1"' in (
        done.stderr
    )
    assert "ensure CRDs are installed first" in done.stderr
    assert prod_without_crd.objects_after == []


def test_with_the_crd_prod_stores_a_servicemonitor_per_service(
    releases: dict[str, Release],
) -> None:
    release = releases["prod"]
    monitors = of_kind(release, "ServiceMonitor")
    services = {d["metadata"]["name"] for d in of_kind(release, "Deployment")}
    assert {m["metadata"]["name"] for m in monitors} <= services
    assert len(monitors) >= 7
    for doc in monitors:
        stored = stored_twin(release, doc)
        assert stored["spec"] == doc["spec"]
        assert stored["spec"]["endpoints"][0]["port"] == "metrics"


# ------------------------------------------------------------------------------ bad values


def test_bad_values_are_refused_before_anything_reaches_the_cluster(
    cluster: LocalCluster, helm_env: dict[str, str]
) -> None:
    done = daert(
        "deploy", "-n", "never-created", "--create-namespace",
        "--set", "retrieval.config.backend=nope", env=helm_env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "values don't meet the specifications of the schema" in done.stderr
    assert "at '/retrieval/config/backend': value must be one of 'pgvector', 'weaviate'" in (
        done.stderr
    )
    reply = cluster.client.get("/api/v1/namespaces/never-created")
    assert reply.status_code == 404


def test_bad_values_leave_an_installed_release_as_it_was(releases: dict[str, Release]) -> None:
    release = releases["dev"]
    done = daert(
        "deploy", "-n", release.namespace, *PROFILES["dev"],
        "--set", "embedding.replicaCount=-1", env=release.env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "/embedding/replicaCount" in done.stderr
    assert [entry["revision"] for entry in release.history()] == [1]
