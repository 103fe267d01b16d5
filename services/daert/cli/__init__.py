"""The `daert` command: `serve` one service, bring the whole local stack `up`, or `deploy`
the Helm chart onto a cluster (and see its `status`, `uninstall` it), or run a local
control plane to deploy onto (`cluster up`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from daert.cli import cluster, deploy, keys
from daert.runtime.registry import SERVICES

# The OpenAI-compatible HTTP gateway: served like a service, though not a gRPC one.
GATEWAY = "gateway"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run one service's gRPC server, or the gateway's HTTP server"
    )
    serve.add_argument("service", choices=[*sorted(SERVICES), GATEWAY])

    up = commands.add_parser("up", help="run every service locally until Ctrl-C")
    up.add_argument("--only", nargs="+", choices=sorted(SERVICES), help="run just these services")
    up.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for health")
    up.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("DAERT_STATE_DIR", ".daert/state")),
        help="where embedded data services keep their data (default: $DAERT_STATE_DIR "
        "or .daert/state)",
    )

    deploy.add_parsers(commands)
    keys.add_parsers(commands)
    cluster.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.service == GATEWAY:
        from daert.gateway.server import serve as serve_gateway

        return serve_gateway()
    if args.command == "serve":
        from daert.runtime.server import serve as serve_service

        return serve_service(args.service)
    if args.command == "up":
        from daert.cli.up import run_stack

        return run_stack(args.only or sorted(SERVICES), args.ready_timeout, args.state_dir)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "cluster":
        return cluster.run(args)
    return deploy.run(args)
