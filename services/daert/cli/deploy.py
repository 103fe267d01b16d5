"""`daert deploy`, `daert status`, `daert uninstall`: the Helm chart, driven through pyhelm3.

`deploy` installs or upgrades the release (`helm upgrade --install`) with the values files
and `--set` overrides merged the way helm merges them; `deploy --dry-run` renders the
manifests offline (`helm template`, no cluster needed) and prints them. `status` shows the
release and, from the cluster, its workloads and their pods (`helm status --show-resources`).

Exit codes: 0 done, 1 helm failed (its message is printed), 2 bad arguments or a missing
chart, values file or helm binary, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_RELEASE = "daert"
DEFAULT_NAMESPACE = "daert"
DEFAULT_CHART = "charts/daert"
DEFAULT_TIMEOUT = "10m"
# The source checkout this module lives in (services/daert/cli/deploy.py), where `make setup`
# builds helm into .tools/bin and where charts/daert lives. Absent in an installed package.
CHECKOUT = Path(__file__).resolve().parents[3]
LOCAL_HELM = Path(".tools/bin/helm")
PROGRESS_EVERY_S = 15.0

# helm's own rules: a release name is a DNS-1123 subdomain of at most 53 characters (pyhelm3
# further allows no dots), a namespace a DNS-1123 label; a duration is Go's time.Duration.
_RELEASE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")

T = TypeVar("T")


class UsageError(Exception):
    """A bad argument or a missing input: reported without a traceback, exit code 2."""


def _say(command: str, message: str) -> None:
    print(f"[daert {command}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ arguments


def _release_name(value: str) -> str:
    if len(value) > 53 or not _RELEASE.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid release name {value!r}: lower-case letters, digits and '-', starting "
            "and ending with a letter or digit, at most 53 characters"
        )
    return value


def _namespace(value: str) -> str:
    if len(value) > 63 or not _RELEASE.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid namespace {value!r}: lower-case letters, digits and '-', starting and "
            "ending with a letter or digit, at most 63 characters"
        )
    return value


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {value!r}: use helm's form, e.g. 300s, 10m, 1h30m"
        )
    return value


def _release_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--release",
        type=_release_name,
        default=DEFAULT_RELEASE,
        help=f"release name (default: {DEFAULT_RELEASE})",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        type=_namespace,
        default=DEFAULT_NAMESPACE,
        help=f"Kubernetes namespace (default: {DEFAULT_NAMESPACE})",
    )


def add_parsers(commands: Any) -> None:
    """Add `deploy`, `status` and `uninstall` to the `daert` command's subparsers."""
    deploy = commands.add_parser(
        "deploy",
        help="install or upgrade the Helm chart (helm upgrade --install)",
        description="Install or upgrade the daert Helm chart through pyhelm3. Values files "
        "are merged in order, then --set and --set-string are applied, as helm does.",
    )
    _release_options(deploy)
    deploy.add_argument(
        "--chart",
        default=DEFAULT_CHART,
        help=f"chart folder or packaged .tgz, or an oci:// reference (default: {DEFAULT_CHART})",
    )
    deploy.add_argument(
        "--create-namespace",
        action="store_true",
        help="create the namespace if it does not exist",
    )
    deploy.add_argument(
        "-f",
        "--values",
        dest="values_files",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML values file (repeatable; later files win)",
    )
    deploy.add_argument(
        "--set",
        dest="set_values",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value: a.b=1, list[0]=x, k={a,b}; several separated by commas "
        "(repeatable; true/false/null/integers are typed as helm types them)",
    )
    deploy.add_argument(
        "--set-string",
        dest="set_strings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="like --set, but the value is always a string",
    )
    deploy.add_argument(
        "--wait",
        action="store_true",
        help="wait until the workloads are ready (and Jobs complete)",
    )
    deploy.add_argument(
        "--timeout",
        type=_duration,
        default=DEFAULT_TIMEOUT,
        help=f"how long helm may wait, e.g. 300s, 10m (default: {DEFAULT_TIMEOUT})",
    )
    deploy.add_argument(
        "--atomic",
        action="store_true",
        help="roll back (or uninstall a first install) if the deployment fails; implies --wait",
    )
    deploy.add_argument(
        "--dry-run",
        nargs="?",
        const="render",
        choices=("render", "cluster"),
        help="do not deploy: `--dry-run` (= render) prints the manifests rendered offline "
        "(helm template, no cluster needed); `--dry-run=cluster` asks the cluster (helm "
        "upgrade --install --dry-run: install or upgrade, the next revision) and prints them",
    )

    deploy.add_argument(
        "--kube-version",
        metavar="VERSION",
        help="with --dry-run (render): the Kubernetes version to render for, e.g. 1.32 "
        "(default: helm's own; a helm built with plain `go install` assumes 1.20)",
    )

    status = commands.add_parser(
        "status",
        help="show the release: revision, status, chart, its workloads and pods",
    )
    _release_options(status)

    uninstall = commands.add_parser("uninstall", help="uninstall the release")
    _release_options(uninstall)
    uninstall.add_argument(
        "--wait",
        action="store_true",
        help="wait until every resource is deleted",
    )
    uninstall.add_argument(
        "--timeout",
        type=_duration,
        default="5m",
        help="how long helm may wait (default: 5m)",
    )


# ------------------------------------------------------------------------------ helm binary


def find_helm(environ: Mapping[str, str] | None = None) -> str:
    """$DAERT_HELM, else .tools/bin/helm (here or in the source checkout), else PATH."""
    environ = os.environ if environ is None else environ
    configured = environ.get("DAERT_HELM")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise UsageError(f"DAERT_HELM={configured}: no such executable file")
        return found
    for candidate in (LOCAL_HELM, CHECKOUT / LOCAL_HELM):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.resolve())
    found = shutil.which("helm", path=environ.get("PATH"))
    if found is None:
        raise UsageError(
            "helm not found: set DAERT_HELM to its path, run `make setup` (builds "
            ".tools/bin/helm) or put helm on PATH"
        )
    return found


def _client(
    helm: str, value_args: Sequence[str] = (), template_args: Sequence[str] = ()
) -> tuple[Any, Any]:
    """A pyhelm3 Client and the Command it runs helm with. pyhelm3 sends values to helm as
    one JSON document on stdin, where every number becomes a float and lists from several
    sources concatenate; the user's -f/--set flags are instead appended to the commands
    that render (`template`, `upgrade --install`), after pyhelm3's empty stdin values, so
    helm merges them itself."""
    from pyhelm3 import Client, Command  # type: ignore[import-untyped]

    class _Command(Command):  # type: ignore[misc]
        async def run(self, command: list[Any], input: bytes | None = None) -> Any:
            if command and command[0] == "template":
                command = [*command, *value_args, *template_args]
            elif command and command[0] == "upgrade":
                command = [*command, *value_args]
            return await super().run(command, input)

    command = _Command(executable=helm)
    try:
        return Client(command, executable=helm), command
    except subprocess.CalledProcessError as exc:
        stderr = (exc.stderr or b"").decode(errors="replace").strip()
        raise UsageError(f"{helm} does not run: {stderr or exc}") from None
    except ValueError as exc:  # `helm version` printed no version number
        raise UsageError(f"{helm} is not helm 3 or later: {exc}") from None


# ------------------------------------------------------------------------------ values


def _split_unescaped(text: str, separator: str, *, braces: bool = False) -> list[str]:
    """Split on `separator` where not escaped by a backslash (nor inside {...} if `braces`)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current += [char, text[i + 1]]
            i += 2
            continue
        if braces and char == "{":
            depth += 1
        elif braces and char == "}" and depth > 0:
            depth -= 1
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def check_set(expression: str, option: str = "--set") -> None:
    """Reject a --set argument that is not KEY=VALUE[,KEY=VALUE...] before helm runs; helm
    itself parses it (strvals), so its typing and list syntax hold exactly."""
    for assignment in _split_unescaped(expression, ",", braces=True):
        key, *value = _split_unescaped(assignment, "=")
        if not value or not key:
            raise UsageError(
                f"{option} {expression!r}: expected KEY=VALUE (e.g. image.tag=1.2.3), several "
                "separated by commas"
            )


def check_values_file(name: str) -> Path:
    """A readable YAML mapping (or an empty file), as an absolute path for helm."""
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"values file {name}: not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"values file {name}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UsageError(f"values file {name}: must be a YAML mapping, not {type(loaded).__name__}")
    return path.resolve()


def value_arguments(
    files: Iterable[str], sets: Iterable[str], set_strings: Iterable[str]
) -> list[str]:
    """helm's own flags for the values, checked first: the files in order, then --set, then
    --set-string, which helm merges exactly as `helm upgrade -f ... --set ...` does."""
    arguments: list[str] = []
    for name in files:
        arguments += ["--values", str(check_values_file(name))]
    for expression in sets:
        check_set(expression)
        arguments += ["--set", expression]
    for expression in set_strings:
        check_set(expression, "--set-string")
        arguments += ["--set-string", expression]
    return arguments


def resolve_chart(reference: str) -> Path | str:
    if reference.startswith("oci://"):
        return reference
    path = Path(reference)
    if not path.exists() and reference == DEFAULT_CHART and (CHECKOUT / reference).exists():
        path = CHECKOUT / reference
    if path.is_dir():
        if not (path / "Chart.yaml").is_file():
            raise UsageError(f"chart {reference}: not a chart (no Chart.yaml in the folder)")
        return path.resolve()
    if path.is_file():
        if not path.name.endswith((".tgz", ".tar.gz")):
            raise UsageError(f"chart {reference}: not a chart folder nor a packaged .tgz")
        return path.resolve()
    raise UsageError(f"chart {reference}: not found")


# ------------------------------------------------------------------------------ output


async def _with_progress(command: str, label: str, work: Awaitable[T]) -> T:
    """Await `work`, saying what it is and, on long work, that it is still going."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    _say(command, f"{label} ...")
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_EVERY_S)
            if done:
                return task.result()
            _say(command, f"still {label} ({loop.time() - started:.0f}s)")
    finally:
        task.cancel()


def _dump_manifests(resources: Iterable[Any]) -> str:
    documents = [doc for doc in resources if doc]
    if not documents:
        return ""
    text: str = yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True)
    return text


def _revision_summary(revision: Any, metadata: Any) -> list[str]:
    release = revision.release
    updated = revision.updated.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    lines = [
        f"release   {release.name} (namespace {release.namespace})",
        f"revision  {revision.revision}",
        f"status    {revision.status.value}",
        f"updated   {updated}",
        f"chart     {metadata.name}-{metadata.version}",
        f"app       {metadata.app_version or '-'}",
    ]
    if revision.description:
        lines.append(f"note      {revision.description}")
    return lines


_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def workloads_from_manifest(resources: Iterable[Any]) -> list[str]:
    """`Kind/name` of each workload a release's manifest declares."""
    return [
        f"{doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"
        for doc in resources
        if isinstance(doc, dict) and doc.get("kind") in _WORKLOADS
    ]


def describe_live_resources(resources: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """The workloads and pods of `helm status --show-resources -o json` (info.resources),
    as lines: readiness of each workload, then phase, readiness and restarts of each pod."""
    lines: list[str] = []
    objects = [obj for key, objs in resources.items() if "(related)" not in key for obj in objs]
    workloads = [obj for obj in objects if obj.get("kind") in _WORKLOADS]
    lines.append("workloads:")
    if not workloads:
        lines.append("  (none)")
    for obj in sorted(workloads, key=lambda o: (o["kind"], o["metadata"]["name"])):
        spec, status = obj.get("spec", {}), obj.get("status", {})
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            state = f"ready {status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}"
        elif obj["kind"] == "DaemonSet":
            desired = status.get("desiredNumberScheduled", 0)
            state = f"ready {status.get('numberReady', 0)}/{desired}"
        elif obj["kind"] == "Job":
            state = f"succeeded {status.get('succeeded', 0)}, failed {status.get('failed', 0)}"
        else:
            state = f"last scheduled {status.get('lastScheduleTime', 'never')}"
        lines.append(f"  {name:<48} {state}")
    # Each "(related)" entry is a PodList, one per workload (its items: the pods its selector
    # matches, none yet right after an install); a pod two selectors match is listed once.
    pods = list(
        {
            pod["metadata"]["name"]: pod
            for key, lists in resources.items()
            if "Pod(related)" in key
            for pod_list in lists
            for pod in pod_list.get("items") or []
        }.values()
    )
    lines.append("pods:")
    if not pods:
        lines.append("  (none)")
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        status = pod.get("status", {})
        containers = status.get("containerStatuses", [])
        ready = sum(1 for c in containers if c.get("ready"))
        restarts = sum(int(c.get("restartCount", 0)) for c in containers)
        total = len(pod.get("spec", {}).get("containers", [])) or len(containers)
        phase = status.get("phase", "Unknown")
        lines.append(
            f"  {pod['metadata']['name']:<48} {phase:<10} ready {ready}/{total}  "
            f"restarts {restarts}"
        )
    return lines


# ------------------------------------------------------------------------------ commands


async def _deploy(args: argparse.Namespace, helm: str) -> int:
    chart_ref = resolve_chart(args.chart)
    value_args = value_arguments(args.values_files, args.set_values, args.set_strings)
    template_args = ["--kube-version", args.kube_version] if args.kube_version else []
    client, _ = _client(helm, value_args, template_args)
    from pydantic import ValidationError

    try:
        chart = await client.get_chart(chart_ref)
    except ValidationError as exc:
        raise UsageError(f"chart {args.chart}: its Chart.yaml is not valid: {exc}") from None
    what = f"{chart.metadata.name}-{chart.metadata.version}"
    if args.dry_run == "render":
        resources = await _with_progress(
            "deploy",
            f"rendering {what} as release {args.release} in namespace {args.namespace}",
            client.template_resources(chart, args.release, namespace=args.namespace),
        )
        sys.stdout.write(_dump_manifests(resources))
        return 0
    waits = " (waiting for readiness)" if args.wait or args.atomic else ""
    action = "simulating" if args.dry_run == "cluster" else "installing or upgrading"
    revision = await _with_progress(
        "deploy",
        f"{action} release {args.release} in namespace {args.namespace} with {what}{waits}, "
        f"timeout {args.timeout}",
        client.install_or_upgrade_release(
            args.release,
            chart,
            atomic=args.atomic,
            create_namespace=args.create_namespace,
            dry_run=args.dry_run == "cluster",
            namespace=args.namespace,
            timeout=args.timeout,
            wait=args.wait,
        ),
    )
    if args.dry_run == "cluster":
        sys.stdout.write(_dump_manifests(await revision.resources()))
        return 0
    metadata = await revision.chart_metadata()
    print("\n".join(_revision_summary(revision, metadata)))
    if revision.notes:
        print()
        print(revision.notes.rstrip())
    return 0


async def _status(args: argparse.Namespace, helm: str) -> int:
    client, command = _client(helm)
    revision = await client.get_current_revision(args.release, namespace=args.namespace)
    metadata = await revision.chart_metadata()
    print("\n".join(_revision_summary(revision, metadata)))
    from pyhelm3 import errors

    try:
        raw = await command.run(
            [
                "status",
                args.release,
                "--namespace",
                args.namespace,
                "--show-resources",
                "--output",
                "json",
            ]
        )
    except errors.Error as exc:
        # Listing pods needs more cluster access than reading the release: fall back to what
        # the release's manifest declares.
        print("workloads (from the release manifest):")
        for workload in workloads_from_manifest(await revision.resources()):
            print(f"  {workload}")
        reason = exc.stderr.decode(errors="replace").strip()
        print(f"pods: not available, they need read access to the cluster ({reason})")
        return 0
    live = json.loads(raw).get("info", {}).get("resources") or {}
    print("\n".join(describe_live_resources(live)))
    return 0


async def _uninstall(args: argparse.Namespace, helm: str) -> int:
    client, _ = _client(helm)
    # Uninstalling an absent release is not an error for pyhelm3; say which it was.
    from pyhelm3 import errors

    try:
        await client.get_current_revision(args.release, namespace=args.namespace)
    except errors.ReleaseNotFoundError:
        _say("uninstall", f"release {args.release} not found in namespace {args.namespace}")
        return 0
    await _with_progress(
        "uninstall",
        f"uninstalling release {args.release} from namespace {args.namespace}",
        client.uninstall_release(
            args.release, namespace=args.namespace, timeout=args.timeout, wait=args.wait
        ),
    )
    print(f"release {args.release} uninstalled from namespace {args.namespace}")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]] = {
    "deploy": _deploy,
    "status": _status,
    "uninstall": _uninstall,
}


def run(args: argparse.Namespace) -> int:
    """Run `daert deploy|status|uninstall`; errors become a message and an exit code."""
    name: str = args.command
    # pyhelm3 logs each failed helm command line as a warning: show it in our format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[daert {name}] %(message)s"))
    helm_log = logging.getLogger("pyhelm3")
    helm_log.addHandler(handler)
    helm_log.setLevel(logging.WARNING)
    helm_log.propagate = False
    try:
        helm = find_helm()
        return asyncio.run(_COMMANDS[name](args, helm))
    except UsageError as exc:
        _say(name, f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(name, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        from pyhelm3 import errors

        if not isinstance(exc, errors.Error):
            raise
        if isinstance(exc, errors.ReleaseNotFoundError):
            _say(name, f"error: release {args.release} not found in namespace {args.namespace}")
            return EXIT_FAILED
        message = exc.stderr.decode(errors="replace").strip() or f"exit code {exc.returncode}"
        _say(name, f"helm failed: {message}")
        return EXIT_FAILED
