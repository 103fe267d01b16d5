"""A release's life on a real API server, in order: an upgrade that changes one service, an
upgrade that cannot become ready rolled back by --atomic, `helm rollback` to revision 1,
uninstall, and an install again. The tests run in file order on the default-values release
(and the prod one for uninstall); each step starts where the previous one left it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from daert.local.kube import LocalCluster

from tests.cluster.conftest import (
    HELM_TIMEOUT,
    RELEASE,
    Release,
    daert,
    deploy_command,
    everything_in,
    helm,
)

pytestmark = pytest.mark.timeout(600)

CHANGE = "embedding.config.max_batch_size=8"
# Asks for more CPU than any simulated node has: the new rerank pods stay Pending.
UNSCHEDULABLE = "rerank.resources.requests.cpu=64"

# What the earlier steps saw, for the later ones.
seen: dict[str, Any] = {}


@pytest.fixture(scope="module")
def release(releases: dict[str, Release]) -> Release:
    return releases["default"]


def replica_sets(release: Release) -> dict[str, dict[str, int]]:
    """Deployment name -> {ReplicaSet name: its replicas}."""
    owned: dict[str, dict[str, int]] = defaultdict(dict)
    for rs in release.items("apps/v1", "ReplicaSet"):
        (owner,) = rs["metadata"]["ownerReferences"]
        owned[owner["name"]][rs["metadata"]["name"]] = rs["spec"]["replicas"]
    return dict(owned)


def active(sets: dict[str, int]) -> str:
    (name,) = [name for name, replicas in sets.items() if replicas > 0]
    return name


def config(release: Release, service: str) -> dict[str, str]:
    data: dict[str, str] = release.stored("ConfigMap", f"daert-{service}")["data"]
    return data


def test_upgrade_rolls_only_the_changed_service_and_keeps_the_passwords(
    release: Release,
) -> None:
    before = replica_sets(release)
    assert all(len(sets) == 1 for sets in before.values()), before
    seen["revision 1"] = {name: active(sets) for name, sets in before.items()}
    passwords = {s: release.secret_data(s) for s in ("daert-postgresql", "daert-redis")}
    seen["passwords"] = passwords
    postgresql = release.stored("StatefulSet", "daert-postgresql", "apps/v1")["status"]

    done = daert(*deploy_command(release.namespace, "--set", CHANGE), env=release.env)
    assert done.returncode == 0, done.stderr
    assert "revision  2" in done.stdout.splitlines()

    after = replica_sets(release)
    assert config(release, "embedding")["DAERT_EMBEDDING_MAX_BATCH_SIZE"] == "8"
    # The embedding pods' config checksum changed: a new ReplicaSet, the old one scaled to 0.
    old = seen["revision 1"]["daert-embedding"]
    assert after["daert-embedding"][old] == 0
    new = active(after["daert-embedding"])
    assert new != old
    seen["revision 2"] = new
    # Every other Deployment kept its one ReplicaSet.
    assert {n: s for n, s in after.items() if n != "daert-embedding"} == {
        n: s for n, s in before.items() if n != "daert-embedding"
    }
    # `lookup` found the generated passwords: unchanged, and PostgreSQL not restarted.
    assert {s: release.secret_data(s) for s in passwords} == passwords
    status = release.stored("StatefulSet", "daert-postgresql", "apps/v1")["status"]
    assert status["currentRevision"] == status["updateRevision"] == postgresql["updateRevision"]


def test_an_upgrade_that_cannot_become_ready_is_rolled_back_by_atomic(
    release: Release, cluster: LocalCluster
) -> None:
    rerank = release.stored("Deployment", "daert-rerank", "apps/v1")["spec"]["template"]
    done = daert(
        "deploy", "-n", release.namespace, "--set", CHANGE, "--set", UNSCHEDULABLE,
        "--atomic", "--timeout", "20s", env=release.env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "has been rolled back due to atomic being set" in done.stderr
    history = release.history()
    assert [(h["revision"], h["status"]) for h in history[-2:]] == [(3, "failed"), (4, "deployed")]
    assert history[-1]["description"] == "Rollback to 2"
    # The scheduler is what refused the new pods.
    events = release.items("v1", "Event", fieldSelector="reason=FailedScheduling")
    assert any("Insufficient cpu" in e["message"] for e in events)
    # Back to revision 2's pods, and nothing left pending.
    assert release.stored("Deployment", "daert-rerank", "apps/v1")["spec"]["template"] == rerank

    def settled() -> bool:
        pods = release.items("v1", "Pod", labelSelector="app.kubernetes.io/component=rerank")
        return [p["status"]["phase"] for p in pods] == ["Running"]

    cluster.wait_for(settled, "one running rerank pod")
    assert active(replica_sets(release)["daert-embedding"]) == seen["revision 2"]


def test_helm_rollback_to_revision_1_restores_its_values(
    release: Release, cluster: LocalCluster
) -> None:
    helm(
        "rollback", RELEASE, "1", "-n", release.namespace, "--wait", "--timeout", HELM_TIMEOUT,
        env=release.env,
    )  # fmt: skip
    history = release.history()
    assert (history[-1]["revision"], history[-1]["status"]) == (5, "deployed")
    assert history[-1]["description"] == "Rollback to 1"
    assert helm("get", "values", RELEASE, "-n", release.namespace, env=release.env).strip() in (
        "USER-SUPPLIED VALUES:\nnull",
        "USER-SUPPLIED VALUES:\n{}",
    )
    assert config(release, "embedding")["DAERT_EMBEDDING_MAX_BATCH_SIZE"] == "32"
    # The Deployment controller scaled revision 1's own ReplicaSet up again.
    sets = replica_sets(release)
    assert {name: active(s) for name, s in sets.items()} == seen["revision 1"]
    assert {s: release.secret_data(s) for s in seen["passwords"]} == seen["passwords"]


def kept_on_purpose(release: Release) -> set[tuple[str, str]]:
    """What the chart keeps on uninstall: its objects annotated helm.sh/resource-policy=keep
    and the claims of its StatefulSets' volumeClaimTemplates (Kubernetes never deletes
    those with the StatefulSet)."""
    kept = set()
    for doc in release.manifest():
        annotations = doc["metadata"].get("annotations") or {}
        if annotations.get("helm.sh/resource-policy") == "keep":
            kept.add((doc["kind"], doc["metadata"]["name"]))
        if doc["kind"] == "StatefulSet":
            for template in doc["spec"].get("volumeClaimTemplates", []):
                for ordinal in range(doc["spec"]["replicas"]):
                    claim = f"{template['metadata']['name']}-{doc['metadata']['name']}-{ordinal}"
                    kept.add(("PersistentVolumeClaim", claim))
    return kept


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (
            "default",
            {("Secret", "daert-postgresql"), ("PersistentVolumeClaim", "data-daert-postgresql-0")},
        ),
        (
            "prod",
            {
                ("Secret", "daert-postgresql"),
                ("PersistentVolumeClaim", "data-daert-postgresql-0"),
                ("PersistentVolumeClaim", "daert-model-cache"),
            },
        ),
    ],
)
def test_uninstall_removes_everything_but_what_the_chart_keeps(
    releases: dict[str, Release],
    cluster: LocalCluster,
    profile: str,
    expected: set[tuple[str, str]],
) -> None:
    release = releases[profile]
    kept = kept_on_purpose(release)
    assert kept == expected
    seen[f"{profile} claims"] = {
        name: release.stored("PersistentVolumeClaim", name)["metadata"]["uid"]
        for kind, name in kept
        if kind == "PersistentVolumeClaim"
    }
    done = daert("uninstall", "-n", release.namespace, "--wait", env=release.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"release {RELEASE} uninstalled from namespace {release.namespace}\n"

    def left() -> set[tuple[str, str]]:
        objects = everything_in(cluster, release.namespace)
        return {(o["kind"], o["metadata"]["name"]) for o in objects}

    # The garbage collector removes ReplicaSets, pods and EndpointSlices after helm.
    cluster.wait_for(lambda: left() == kept, f"only {sorted(kept)} left")


def test_an_install_after_uninstall_adopts_the_kept_password_and_volume(
    release: Release,
) -> None:
    done = daert(*deploy_command(release.namespace), env=release.env)
    assert done.returncode == 0, done.stderr
    assert "revision  1" in done.stdout.splitlines()
    assert release.secret_data("daert-postgresql") == seen["passwords"]["daert-postgresql"]
    claim = release.stored("PersistentVolumeClaim", "data-daert-postgresql-0")
    assert {claim["metadata"]["name"]: claim["metadata"]["uid"]} == seen["default claims"]
    assert claim["status"]["phase"] == "Bound"
    # The Redis password is not kept: a new one was generated.
    assert release.secret_data("daert-redis") != seen["passwords"]["daert-redis"]
