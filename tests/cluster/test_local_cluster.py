"""daert.local.kube itself: loopback listeners only, its own CA and identities, a clear error
and nothing left behind when a binary is missing or a component fails, and `daert cluster
up` until SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from daert.local import kube
from daert.local.kube import LocalCluster

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(300)


def processes_of(folder: Path) -> list[int]:
    """The pids whose command line names `folder` (every component names its own files)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


def test_every_component_listens_on_the_loopback_only(cluster: LocalCluster) -> None:
    pids = processes_of(cluster.data_dir)
    assert len(pids) == 5  # etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
    addresses = listening_addresses(pids)
    assert len(addresses) >= 5, addresses
    assert {address for address, _ in addresses} <= {"127.0.0.1"}, addresses


def test_the_run_has_its_own_ca_and_identities(cluster: LocalCluster) -> None:
    # As the admin of the kubeconfig: a client certificate in system:masters.
    review = cluster.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    user = review["status"]["userInfo"]
    assert user["username"] == "daert-admin"
    assert "system:masters" in user["groups"]
    # Without a certificate the server knows no one; nor is its own certificate one the
    # system trusts.
    ca = ssl.create_default_context(cafile=cluster.data_dir / "pki" / "ca.crt")
    anonymous = httpx.get(f"{cluster.server}/api/v1/namespaces", verify=ca)
    assert anonymous.status_code == 403
    assert "system:anonymous" in anonymous.json()["message"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{cluster.server}/version")
    # The controllers run under their own service accounts, not as the admin.
    accounts = cluster.get("/api/v1/namespaces/kube-system/serviceaccounts")["items"]
    assert {"replicaset-controller", "job-controller", "horizontal-pod-autoscaler"} <= {
        a["metadata"]["name"] for a in accounts
    }


def only_logs_left(folder: Path) -> bool:
    return all(entry.suffix == ".log" for entry in folder.iterdir())


def test_a_missing_binary_fails_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etcd_only = tmp_path / "bin"
    etcd_only.mkdir()
    (etcd_only / "etcd").symlink_to(kube.find_binary("etcd"))
    monkeypatch.setattr(kube, "CHECKOUT_TOOLS", tmp_path / "no-tools")
    monkeypatch.setenv("PATH", str(etcd_only))
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        LocalCluster(tmp_path / "run").start()
    assert time.monotonic() - started < 1
    assert str(error.value) == (
        f"kube-apiserver not found in {tmp_path / 'no-tools'} nor on PATH: `make setup` "
        "builds it from k8s.io/kubernetes (tools/kube)"
    )
    assert not (tmp_path / "run").exists()


def test_a_failing_component_stops_the_others_and_removes_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("kube-apiserver", "kube-scheduler", "kwok"):
        (tools / name).symlink_to(kube.find_binary(name))
    broken = tools / "kube-controller-manager"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(kube, "CHECKOUT_TOOLS", tools)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError) as error:
        LocalCluster(run).start()
    log = run / "kube-controller-manager.log"
    assert (
        str(error.value) == f"kube-controller-manager exited with code 3 while starting; see {log}"
    )
    assert log.read_text() == "cannot start\n"
    # etcd and the API server had started: they are stopped, and only the logs remain.
    assert (run / "kube-apiserver.log").stat().st_size > 0
    assert processes_of(run) == []
    assert only_logs_left(run)


def test_cluster_up_runs_until_sigterm(tmp_path: Path) -> None:
    folder = tmp_path / "cluster"
    process = subprocess.Popen(
        [sys.executable, "-m", "daert", "cluster", "up", "--dir", str(folder), "--nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("API server https://127.0.0.1:"), first
        assert process.stdout.readline().strip() == f"export KUBECONFIG={folder / 'kubeconfig'}"
        done = subprocess.run(
            [str(REPO / ".tools" / "bin" / "helm"), "list", "--all-namespaces"],
            env={**os.environ, "KUBECONFIG": str(folder / "kubeconfig")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["NAME", "NAMESPACE", "REVISION", "UPDATED", "STATUS",
                                       "CHART", "APP", "VERSION"]  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert processes_of(folder) == []
    assert only_logs_left(folder)
