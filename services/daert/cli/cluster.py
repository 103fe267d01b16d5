"""`daert cluster up`: a local Kubernetes control plane (daert.local.kube) to try the chart
on, until Ctrl-C or SIGTERM. The API server, admission and the controllers are real; kwok
simulates the nodes, so pods become Ready but no container runs.

Exit codes: 0 stopped, 1 it did not start (a binary missing, a component failing).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(".daert/cluster")


def add_parsers(commands: Any) -> None:
    """Add `cluster up` to the `daert` command's subparsers."""
    cluster = commands.add_parser(
        "cluster", help="a local Kubernetes control plane to install the chart on"
    )
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    up = actions.add_parser(
        "up",
        help="run etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok "
        "(simulated nodes) on loopback ports until Ctrl-C",
    )
    up.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"its data and logs (default: {DEFAULT_DIR}); the data is removed on exit, the "
        "logs are kept",
    )
    up.add_argument("--nodes", type=int, default=3, help="simulated nodes (default: 3)")


def run(args: argparse.Namespace) -> int:
    from daert.local.kube import LocalCluster

    # The chart's sandbox asks for gVisor in the default values: give it the RuntimeClass.
    cluster = LocalCluster(args.dir, nodes=args.nodes, runtime_classes=["gvisor"])
    try:
        kubeconfig = cluster.start()
    except RuntimeError as exc:
        print(f"[daert cluster] error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        print(f"API server {cluster.server}, {args.nodes} kwok nodes; kubeconfig {kubeconfig}")
        print(f"  export KUBECONFIG={kubeconfig.resolve()}")
        print("  daert deploy -n daert --create-namespace --wait")
        print("Ctrl-C stops it and removes its data.", flush=True)
        stopping.wait()
    finally:
        print("[daert cluster] stopping", file=sys.stderr, flush=True)
        cluster.stop()
    return 0
