"""An embedded single-node Weaviate: the `weaviate-server` binary that `make setup` builds
(go install github.com/weaviate/weaviate/cmd/weaviate-server), run as a child process.

It listens on 127.0.0.1 only, on free ports chosen at the first start and kept in the data
folder, so a restart finds its Raft peer address unchanged. Anonymous access, no modules:
the retrieval service brings its own vectors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path
from typing import IO

from daert.local.child import free_port, http_ok, terminate, wait_ready

WEAVIATE_BIN_ENV = "DAERT_WEAVIATE_BIN"
TOOLS_CACHE = Path.home() / ".cache" / "daert" / "tools"
_PORT_NAMES = ("http", "grpc", "gossip", "data", "raft", "raft_internal", "profiling")


def find_binary() -> Path:
    """`DAERT_WEAVIATE_BIN`, else the newest ~/.cache/daert/tools/weaviate-*/weaviate-server,
    else `weaviate-server` on PATH (make puts .tools/bin there)."""
    configured = os.environ.get(WEAVIATE_BIN_ENV)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"{WEAVIATE_BIN_ENV}={configured} is not an executable file")
        return path
    built = [p for p in TOOLS_CACHE.glob("weaviate-*/weaviate-server") if os.access(p, os.X_OK)]
    if built:
        return max(built, key=lambda p: _version_key(p.parent.name))
    on_path = shutil.which("weaviate-server")
    if on_path:
        return Path(on_path)
    raise RuntimeError(
        f"weaviate-server not found in {TOOLS_CACHE}/weaviate-*/ nor on PATH: run `make setup` "
        f"(it builds it with go install) or set {WEAVIATE_BIN_ENV}"
    )


def _version_key(folder: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", folder))


class EmbeddedWeaviate:
    """A Weaviate server whose data lives in `data_dir`; it keeps running until `stop`."""

    def __init__(self, data_dir: Path, binary: Path | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.binary = binary
        self.log_path = self.data_dir / "weaviate.log"
        self._ports_path = self.data_dir / "ports.json"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ports: dict[str, int] = {}

    @property
    def http_url(self) -> str:
        assert self._ports, "start() first"
        return f"http://127.0.0.1:{self._ports['http']}"

    @property
    def grpc_port(self) -> int:
        assert self._ports, "start() first"
        return self._ports["grpc"]

    def start(self, timeout_s: float = 90.0) -> tuple[str, int]:
        """Start the server and wait until it is ready; returns (REST URL, gRPC port)."""
        if self._process is not None and self._process.poll() is None:
            return self.http_url, self.grpc_port
        binary = self.binary or find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ports = self._choose_ports()
        self._ports_path.write_text(json.dumps(self._ports))
        ports = self._ports
        env = {
            **os.environ,
            "PERSISTENCE_DATA_PATH": str(self.data_dir / "data"),
            "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "true",
            "AUTHENTICATION_APIKEY_ENABLED": "false",
            "DEFAULT_VECTORIZER_MODULE": "none",
            # Properties are defined by the retrieval service, never guessed from data.
            "AUTOSCHEMA_ENABLED": "false",
            "ENABLE_MODULES": "",
            "QUERY_DEFAULTS_LIMIT": "25",
            "DISABLE_TELEMETRY": "true",
            "LOG_LEVEL": "info",
            "GRPC_PORT": str(ports["grpc"]),
            # One node, reachable on the loopback only (left alone it advertises the first
            # address it finds, which may be IPv6 and break its own Raft listener).
            "CLUSTER_HOSTNAME": "node1",
            "CLUSTER_ADVERTISE_ADDR": "127.0.0.1",
            "CLUSTER_BIND_ADDR": "127.0.0.1",
            "CLUSTER_GOSSIP_BIND_PORT": str(ports["gossip"]),
            "CLUSTER_DATA_BIND_PORT": str(ports["data"]),
            "RAFT_PORT": str(ports["raft"]),
            "RAFT_INTERNAL_RPC_PORT": str(ports["raft_internal"]),
            "RAFT_JOIN": f"node1:{ports['raft']}",
            "RAFT_BOOTSTRAP_EXPECT": "1",
            # Lets a single node elect itself again if its ports had to change.
            "RAFT_ENABLE_ONE_NODE_RECOVERY": "true",
            # Raft's timeouts unscaled (the default multiplies them by 5 for networks of many
            # nodes): the lone node elects itself in about a second instead of five or more.
            "RAFT_TIMEOUTS_MULTIPLIER": "1",
            "GO_PROFILING_DISABLE": "true",
            "GO_PROFILING_PORT": str(ports["profiling"]),  # unused, but never a shared default
        }
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(binary), "--host", "127.0.0.1", "--port", str(ports["http"]), "--scheme", "http"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the parent does not reach it first
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.http_url, self.grpc_port

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None
        ready = partial(http_ok, f"{self.http_url}/v1/.well-known/ready")
        wait_ready(self._process, ready, "the embedded Weaviate", self.log_path, timeout_s)

    def _choose_ports(self) -> dict[str, int]:
        """The ports of the previous start when they are all free, else fresh ones."""
        try:
            previous = json.loads(self._ports_path.read_text())
            if set(previous) == set(_PORT_NAMES) and all(map(_free, previous.values())):
                return {name: int(previous[name]) for name in _PORT_NAMES}
        except (OSError, ValueError):
            pass
        # Weaviate expects the data port right after the gossip port (which is also UDP).
        taken: set[int] = set()
        gossip = 0
        for _ in range(100):
            gossip = free_port()
            if gossip < 65535 and _free(gossip) and _free(gossip + 1):
                break
        else:
            raise RuntimeError("found no two adjacent free ports for Weaviate's cluster layer")
        taken.update((gossip, gossip + 1))
        ports = {"gossip": gossip, "data": gossip + 1}
        for name in _PORT_NAMES:
            if name not in ports:
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                ports[name] = port
        return {name: ports[name] for name in _PORT_NAMES}

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `timeout_s`."""
        process, self._process = self._process, None
        terminate(process, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None


def _free(port: int) -> bool:
    """Whether `port` can be bound on 127.0.0.1, over TCP and UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            # As servers bind: a port with connections in TIME_WAIT is still usable.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True
