"""A local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler as child processes, with nodes simulated by kwok (sigs.k8s.io/kwok). The
chart's tests install, upgrade and uninstall releases on it, and `daert cluster up` runs one.

Everything a cluster does to a chart before a container starts is real: the API server's
validation and defaulting, admission (Pod Security), the controllers (Deployments into
ReplicaSets into Pods, Jobs, PVC binding, the HPA and PDB status) and the scheduler. No
container runs: kwok plays the kubelet, moving scheduled pods to Running and Ready (and Job
pods to Succeeded) and finishing their deletion. Images are never pulled and the pod IPs
route nowhere.

Debian's etcd 3.4 cannot answer progress requests, so the API server refuses watch-list
requests (logged as "RequestWatchProgress is disabled"); the components fall back to list
and watch, but kwok's caches then lag: a pod being deleted can take some 20 s to go, and its
node-lease updates conflict (hence the node monitor's grace period of an hour, below).

Every listener is on 127.0.0.1, on free ports chosen per run. Each run makes its own CA,
serving and client certificates and service-account key (ECDSA P-256, `cryptography`) in
its folder; `stop` ends the processes and removes everything there but the logs. The
binaries are Debian's `etcd` (package etcd-server) and the ones `make setup` builds into
.tools/bin (cached in ~/.cache/daert/tools).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx

from daert.local.child import free_port, terminate, wait_ready

# The checkout's .tools/bin, where `make setup` links the binaries it builds.
CHECKOUT_TOOLS = Path(__file__).resolve().parents[3] / ".tools" / "bin"
SERVICE_CIDR = "10.96.0.0/16"
# The first address of the service range: the `kubernetes` Service, named in the serving cert.
API_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
# The address kwok gives every simulated node: nothing listens there for them (no kubelet).
NODE_IP = "127.0.0.1"
# What each simulated node offers the scheduler.
NODE_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
# The nodes kwok manages carry this annotation (kwok's convention).
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

_INSTALL_HINTS = {
    "etcd": "Debian: apt-get install etcd-server (`make setup` does it as root)",
    "kube-apiserver": "`make setup` builds it from k8s.io/kubernetes (tools/kube)",
    "kube-controller-manager": "`make setup` builds it from k8s.io/kubernetes (tools/kube)",
    "kube-scheduler": "`make setup` builds it from k8s.io/kubernetes (tools/kube)",
    "kwok": "`make setup` builds it with go install sigs.k8s.io/kwok/cmd/kwok",
}

# kwok's behaviour, as Stages (its API for what a simulated node or pod goes through): nodes
# become Ready with NODE_CAPACITY; scheduled pods start at once (init containers completed,
# sidecars and containers running and ready); pods of Jobs then succeed; pods being deleted
# are gone once their finalizers are.
_KWOK_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-ready
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
      - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
        operator: NotIn
        values: ["True"]
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - type: {{ .type | Quote }}
        status: {{ .status | Quote }}
        reason: {{ .reason | Quote }}
        message: {{ .message | Quote }}
        lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      addresses:
      - {type: InternalIP, address: {{ NodeIP | Quote }}}
      - {type: Hostname, address: {{ .metadata.name | Quote }}}
      capacity: %(capacity)s
      allocatable: %(capacity)s
      nodeInfo:
        architecture: amd64
        operatingSystem: linux
        kubeletVersion: kwok
        kubeProxyVersion: kwok
        containerRuntimeVersion: kwok
        kernelVersion: kwok
        osImage: kwok
        machineID: ""
        systemUUID: ""
        bootID: ""
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-running
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
      - {key: .status.phase, operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      phase: Running
      startTime: {{ $now | Quote }}
      conditions:
      {{ range list "PodReadyToStartContainers" "Initialized" "ContainersReady" "Ready" }}
      - type: {{ . }}
        status: "True"
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      initContainerStatuses:
      {{ range .spec.initContainers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        restartCount: 0
        {{ if eq (or .restartPolicy "") "Always" }}
        ready: true
        started: true
        state: {running: {startedAt: {{ $now | Quote }}}}
        {{ else }}
        ready: true
        state:
          terminated:
            exitCode: 0
            reason: Completed
            startedAt: {{ $now | Quote }}
            finishedAt: {{ $now | Quote }}
        {{ end }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        restartCount: 0
        ready: true
        started: true
        state: {running: {startedAt: {{ $now | Quote }}}}
      {{ end }}
      hostIP: {{ NodeIP | Quote }}
      {{ $hostNet := or .spec.hostNetwork false }}
      {{ $meta := .metadata }}
      {{ with PodIPWith .spec.nodeName $hostNet $meta.uid $meta.name $meta.namespace }}
      podIP: {{ . | Quote }}
      podIPs: [{ip: {{ . | Quote }}}]
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: job-pod-succeeded
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
      - {key: .status.phase, operator: In, values: [Running]}
      - {key: '.metadata.ownerReferences.[].kind', operator: In, values: [Job]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      phase: Succeeded
      conditions:
      {{ range list "Ready" "ContainersReady" }}
      - type: {{ . }}
        status: "False"
        reason: PodCompleted
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        restartCount: 0
        ready: false
        started: false
        state:
          terminated:
            exitCode: 0
            reason: Completed
            startedAt: {{ $now | Quote }}
            finishedAt: {{ $now | Quote }}
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-deleted
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: Exists}
  next:
    finalizers: {empty: true}
    delete: true
"""


def find_binary(name: str) -> Path:
    """`name` in the checkout's .tools/bin, else on PATH; a RuntimeError saying how to get it
    otherwise."""
    candidate = CHECKOUT_TOOLS / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise RuntimeError(f"{name} not found in {CHECKOUT_TOOLS} nor on PATH: {_INSTALL_HINTS[name]}")


# ------------------------------------------------------------------------------ certificates


def _write_pki(folder: Path, clients: Mapping[str, tuple[str, str | None]]) -> None:
    """A CA, a serving certificate for 127.0.0.1 and the API server's in-cluster names, a
    client certificate per entry of `clients` (file stem -> (user, group)) and the service-
    account signing key. Keys are readable by this user only; the CA key is never written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # A minute back for clock skew; a year ahead, though a run lasts minutes to days.
    not_before, not_after = now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=365)

    def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> None:
        path = folder / name
        path.touch(mode=0o600)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                # SEC 1 ("EC PRIVATE KEY"): what every component reads, the API server's
                # service-account key loader included.
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    def name_of(common_name: str, organization: str | None = None) -> x509.Name:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        return x509.Name(attributes)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name_of("daert local cluster CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(
        stem: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: Sequence[Any] = ()
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(f"{stem}.key", key)

    server_names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    issue(
        "serving",
        name_of("kube-apiserver"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            *(x509.DNSName(n) for n in server_names),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address(API_SERVICE_IP)),
        ],
    )
    for stem, (user, group) in clients.items():
        issue(stem, name_of(user, group), ExtendedKeyUsageOID.CLIENT_AUTH)
    service_account = ec.generate_private_key(ec.SECP256R1())
    write_key("service-account.key", service_account)
    (folder / "service-account.pub").write_bytes(
        service_account.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# ------------------------------------------------------------------------------ the cluster


class LocalCluster:
    """A control plane whose state lives in `data_dir`, with `nodes` simulated nodes spread
    over `zones` (labelled topology.kubernetes.io/zone and kubernetes.io/hostname) and
    `volumes` PersistentVolumes for claims without a storage class (there is no provisioner),
    and a RuntimeClass for each of `runtime_classes` (pods may name it; none runs anyway).
    Use it as a context manager, or `start` and then always `stop`."""

    # Client identities: the admin (system:masters, also used by kwok), and the controller
    # manager and scheduler as the users their default RBAC roles are bound to.
    _CLIENTS: Mapping[str, tuple[str, str | None]] = {
        "admin": ("daert-admin", "system:masters"),
        "kwok": ("kwok", "system:masters"),
        "controller-manager": ("system:kube-controller-manager", None),
        "scheduler": ("system:kube-scheduler", None),
    }

    def __init__(
        self,
        data_dir: Path,
        *,
        nodes: int = 3,
        zones: Sequence[str] = ("zone-a", "zone-b", "zone-c"),
        volumes: int = 12,
        runtime_classes: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.nodes = [f"kwok-node-{i}" for i in range(nodes)]
        self.zones = list(zones)
        self.volumes = volumes
        self.runtime_classes = list(runtime_classes)
        self.kubeconfig = self.data_dir / "kubeconfig"
        self._pki = self.data_dir / "pki"
        self._ports: dict[str, int] = {}
        self._processes: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        self._client: httpx.Client | None = None

    @property
    def server(self) -> str:
        assert self._ports, "start() first"
        return f"https://127.0.0.1:{self._ports['apiserver']}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 180.0) -> Path:
        """Start every component, wait until the API server is ready, the controllers and the
        scheduler answer and every node is Ready; returns the admin kubeconfig's path."""
        binaries = {name: find_binary(name) for name in _INSTALL_HINTS}  # fail before starting
        deadline = time.monotonic() + timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(binaries, deadline)
        except BaseException:
            self.stop()
            raise
        return self.kubeconfig

    def _start(self, binaries: Mapping[str, Path], deadline: float) -> None:
        def left() -> float:
            return max(deadline - time.monotonic(), 1.0)

        names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        self._ports = {name: free_port() for name in names}
        ports = self._ports
        _write_pki(self._pki, self._CLIENTS)
        for stem in self._CLIENTS:
            self._write_kubeconfig(stem)
        shutil.copyfile(self.data_dir / "kubeconfig-admin", self.kubeconfig)
        self.kubeconfig.chmod(0o600)

        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        etcd = self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                "--name", "local",
                "--data-dir", str(self.data_dir / "etcd"),
                "--listen-client-urls", etcd_url,
                "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"local={peer_url}",
                "--listen-metrics-urls", "",
                "--log-level", "warn",
            ],
        )  # fmt: skip
        wait_ready(
            etcd, partial(self._http_ok, f"{etcd_url}/health"), "etcd", self._log("etcd"), left()
        )

        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                "--etcd-servers", etcd_url,
                "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                "--secure-port", str(ports["apiserver"]),
                "--tls-cert-file", str(self._pki / "serving.crt"),
                "--tls-private-key-file", str(self._pki / "serving.key"),
                "--client-ca-file", str(self._pki / "ca.crt"),
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(self._pki / "service-account.pub"),
                "--service-account-signing-key-file", str(self._pki / "service-account.key"),
                "--service-cluster-ip-range", SERVICE_CIDR,
                "--authorization-mode", "RBAC",
                # PodSecurity is on by default already; named so that no default change
                # could turn it off unnoticed. Namespaces choose their level by label.
                "--enable-admission-plugins", "PodSecurity",
                # No kube-proxy and no real endpoint for the `kubernetes` Service: without
                # this the reconciler keeps reporting that a loopback address cannot be one.
                "--endpoint-reconciler-type", "none",
                "--profiling=false",
            ],
        )  # fmt: skip
        wait_ready(
            apiserver,
            partial(self._http_ok, f"{self.server}/readyz"),
            "kube-apiserver",
            self._log("kube-apiserver"),
            left(),
            0.25,
        )
        self._create_cluster_objects()

        serving = ["--tls-cert-file", str(self._pki / "serving.crt"),
                   "--tls-private-key-file", str(self._pki / "serving.key")]  # fmt: skip
        controller_manager = self._spawn(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                "--kubeconfig", str(self.data_dir / "kubeconfig-controller-manager"),
                "--bind-address", "127.0.0.1",
                "--secure-port", str(ports["controller-manager"]),
                *serving,
                "--leader-elect=false",
                "--service-account-private-key-file", str(self._pki / "service-account.key"),
                "--root-ca-file", str(self._pki / "ca.crt"),
                # Each controller under its own service account, as in a real cluster, so
                # their RBAC roles (not system:masters) decide what they may do.
                "--use-service-account-credentials",
                "--service-cluster-ip-range", SERVICE_CIDR,
                # kwok renews the nodes' leases from a cache that lags (see the module's
                # docstring): its updates can conflict for minutes, and with the default 50 s
                # the nodes were marked unreachable and every pod not Ready mid-test.
                "--node-monitor-grace-period", "1h",
                "--profiling=false",
            ],
        )  # fmt: skip
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(binaries["kube-scheduler"]),
                "--kubeconfig", str(self.data_dir / "kubeconfig-scheduler"),
                "--bind-address", "127.0.0.1",
                "--secure-port", str(ports["scheduler"]),
                *serving,
                "--leader-elect=false",
                "--profiling=false",
            ],
        )  # fmt: skip
        kwok_config = self.data_dir / "kwok.yaml"
        kwok_config.write_text(_KWOK_STAGES % {"capacity": json.dumps(NODE_CAPACITY)})
        key, value = KWOK_NODE_ANNOTATION
        kwok = self._spawn(
            "kwok",
            [
                str(binaries["kwok"]),
                "--config", str(kwok_config),
                "--kubeconfig", str(self.data_dir / "kubeconfig-kwok"),
                "--manage-nodes-with-annotation-selector", f"{key}={value}",
                "--node-ip", NODE_IP,
                "--cidr", POD_CIDR,
                "--node-lease-duration-seconds", "40",
            ],
        )  # fmt: skip
        for what, process, port in [
            ("kube-controller-manager", controller_manager, ports["controller-manager"]),
            ("kube-scheduler", scheduler, ports["scheduler"]),
        ]:
            ready = partial(self._http_ok, f"https://127.0.0.1:{port}/healthz")
            wait_ready(process, ready, what, self._log(what), left(), 0.25)
        wait_ready(kwok, self._nodes_ready, "kwok (nodes Ready)", self._log("kwok"), left(), 0.25)
        # The service-account controller works: pods can be admitted in `default`.
        wait_ready(
            controller_manager,
            partial(self._exists, "/api/v1/namespaces/default/serviceaccounts/default"),
            "kube-controller-manager (the default ServiceAccount)",
            self._log("kube-controller-manager"),
            left(),
            0.25,
        )

    def _write_kubeconfig(self, stem: str) -> None:
        """kubeconfig-<stem>, embedding the CA and the client certificate (JSON is YAML)."""
        from base64 import b64encode

        def data(name: str) -> str:
            return b64encode((self._pki / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": data("ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": stem,
                    "user": {
                        "client-certificate-data": data(f"{stem}.crt"),
                        "client-key-data": data(f"{stem}.key"),
                    },
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": stem}}],
            "current-context": "local",
        }
        path = self.data_dir / f"kubeconfig-{stem}"
        path.touch(mode=0o600)
        path.write_text(json.dumps(config, indent=2))

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = self._log(name).open("ab")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the parent does not reach it first
        )
        self._processes.append((name, process, log))
        return process

    def _log(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"

    # -------------------------------------------------------------------------- API access

    @property
    def client(self) -> httpx.Client:
        """An HTTP client for the API server, as the admin."""
        if self._client is None:
            context = ssl.create_default_context(cafile=str(self._pki / "ca.crt"))
            context.load_cert_chain(self._pki / "admin.crt", self._pki / "admin.key")
            self._client = httpx.Client(base_url=self.server, verify=context, timeout=10.0)
        return self._client

    def get(self, path: str) -> dict[str, Any]:
        """GET an API path (e.g. /api/v1/namespaces); the object, or HTTPStatusError."""
        reply = self.client.get(path)
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST an object to a collection path; the stored object, or HTTPStatusError."""
        reply = self.client.post(path, json=body)
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create a namespace and wait for its default ServiceAccount (which pods without one
        of their own need to be admitted)."""
        self.create(
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            },
        )
        self.wait_for(
            partial(self._exists, f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            f"the default ServiceAccount of namespace {name}",
        )

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        """Poll `condition` until true; TimeoutError naming `what` otherwise."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:g} s")
            time.sleep(0.2)

    def _exists(self, path: str) -> bool:
        try:
            return self.client.get(path).status_code == 200
        except httpx.HTTPError:
            return False

    def _http_ok(self, url: str) -> bool:
        """GET `url` answers 200 (https: the run's CA, as the admin; the controller manager
        and the scheduler, which know no client CA, take it as anonymous)."""
        try:
            if url.startswith("https:"):
                return self.client.get(url, timeout=2.0).status_code == 200
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _nodes_ready(self) -> bool:
        try:
            nodes = self.get("/api/v1/nodes")["items"]
        except httpx.HTTPError:
            return False
        ready = {
            node["metadata"]["name"]
            for node in nodes
            for condition in node.get("status", {}).get("conditions", [])
            if condition["type"] == "Ready" and condition["status"] == "True"
        }
        return ready >= set(self.nodes)

    def _create_cluster_objects(self) -> None:
        for name in self.runtime_classes:
            self.create(
                "/apis/node.k8s.io/v1/runtimeclasses",
                {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                 "metadata": {"name": name}, "handler": name},
            )  # fmt: skip
        key, value = KWOK_NODE_ANNOTATION
        for i, name in enumerate(self.nodes):
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": self.zones[i % len(self.zones)],
                "type": "kwok",
            }
            self.create(
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": labels, "annotations": {key: value}},
                },
            )
        # Static volumes, since nothing provisions: any claim without a storage class binds to
        # one that is large enough. Nothing mounts them (no container runs).
        for i in range(self.volumes):
            self.create(
                "/api/v1/persistentvolumes",
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"local-volume-{i}"},
                    "spec": {
                        "capacity": {"storage": "100Gi"},
                        "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": str(self.data_dir / "volumes" / str(i))},
                    },
                },
            )

    # -------------------------------------------------------------------------- stopping

    def stop(self) -> None:
        """Stop every component and remove the run's data (etcd, keys, certificates,
        kubeconfigs), keeping the logs. Idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        # The API server's clients all at once, then the API server, then etcd.
        for name, process, _ in self._processes:
            if name not in ("etcd", "kube-apiserver") and process.poll() is None:
                process.terminate()
        while self._processes:
            _, process, log = self._processes.pop()
            terminate(process)
            log.close()
        if self.data_dir.is_dir():
            for entry in self.data_dir.iterdir():
                if entry.suffix == ".log":
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
