"""`daert deploy`, `status` and `uninstall` through pyhelm3 and the real helm binary that
`make setup` builds: rendering with values files and --set, helm's own --set semantics,
the errors a user meets (bad arguments, missing files, no helm, no cluster) as clean
messages and exit codes, never a traceback. These tests point helm at no cluster, and
check that the commands needing one fail with helm's "cluster unreachable" message; the
real install, upgrade, status and uninstall run on a local API server in tests/cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from daert.cli import deploy

ROOT = Path(__file__).resolve().parents[2]

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-settings
  namespace: {{ .Release.Namespace }}
data:
  greeting: {{ .Values.greeting | quote }}
  replicas: {{ .Values.replicas | quote }}
  kind-of-replicas: {{ kindOf .Values.replicas | quote }}
  items: {{ toJson .Values.items | quote }}
  values: {{ toJson .Values | quote }}
  kube-version: {{ .Capabilities.KubeVersion.Version | quote }}
"""


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return deploy.find_helm()
    except deploy.UsageError as exc:
        pytest.fail(f"{exc} (`make setup` builds it)")


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    """A minimal chart: one ConfigMap that echoes its values."""
    folder = tmp_path / "mini"
    (folder / "templates").mkdir(parents=True)
    (folder / "Chart.yaml").write_text(
        "apiVersion: v2\nname: mini\nversion: 0.1.0\nappVersion: '1.2.3'\n"
    )
    (folder / "values.yaml").write_text("greeting: hello\nreplicas: 1\nitems: [a, b]\n")
    (folder / "templates" / "configmap.yaml").write_text(CONFIGMAP)
    return folder


@pytest.fixture
def env(tmp_path: Path, helm: str) -> dict[str, str]:
    """helm's state under tmp_path and a kubeconfig whose API server refuses connections
    (whatever kubeconfig the machine has is never used)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "users": [{"name": "none", "user": {}}],
                "current-context": "none",
            }
        )
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
    environ |= {
        "KUBECONFIG": str(kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }
    environ.pop("DAERT_HELM", None)
    return environ


def daert(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "daert", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def rendered(stdout: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def configmap_data(stdout: str) -> dict[str, str]:
    (configmap,) = rendered(stdout)
    assert configmap["kind"] == "ConfigMap"
    data: dict[str, str] = configmap["data"]
    return data


def test_dry_run_renders_the_chart_offline(
    chart: Path, env: dict[str, str], tmp_path: Path
) -> None:
    done = daert(
        "deploy", "--chart", chart, "--dry-run", "--release", "demo", "-n", "team-a", env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (configmap,) = rendered(done.stdout)
    assert configmap["metadata"] == {"name": "demo-settings", "namespace": "team-a"}
    assert configmap["data"]["greeting"] == "hello"
    assert "[daert deploy] rendering mini-0.1.0 as release demo in namespace team-a" in (
        done.stderr
    )


def test_values_files_and_set_reach_the_rendered_manifests(
    chart: Path, env: dict[str, str], tmp_path: Path
) -> None:
    first = tmp_path / "first.yaml"
    first.write_text("greeting: from-first\nitems: [one, two, three]\nextra: {a: 1, b: 2}\n")
    second = tmp_path / "second.yaml"
    second.write_text("greeting: from-second\nextra: {b: 3}\n")
    done = daert(
        "deploy", "--chart", chart, "--dry-run", "-f", first, "--values", second,
        "--set", "replicas=3,extra.c=true", "--set-string", "extra.d=007", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = configmap_data(done.stdout)
    assert data["greeting"] == "from-second"  # later files win
    assert json.loads(data["items"]) == ["one", "two", "three"]  # lists are replaced, not appended
    assert data["replicas"] == "3" and data["kind-of-replicas"] == "int64"
    values = json.loads(data["values"])
    assert values["extra"] == {"a": 1, "b": 3, "c": True, "d": "007"}

    overridden = daert(
        "deploy", "--chart", chart, "--dry-run", "-f", first, "--set", "greeting=cli", env=env
    )
    assert configmap_data(overridden.stdout)["greeting"] == "cli"  # --set beats files


@pytest.mark.parametrize(
    "expression",
    [
        "greeting=plain",
        "replicas=5",
        "replicas=0",
        "replicas=007",
        "replicas=1.5",
        "replicas=-4",
        "greeting=TRUE",
        "greeting=null",
        "items={p,q}",
        "items={}",
        "items[1]=second",
        "items[3]=gap",
        "a.b.c=deep,a.b.d=also",
        r"dotted\.key=1",
        r"greeting=a\,b",
        "greeting=x=y",
        "list[0].name=n,list[0].port=80",
        "greeting=",
    ],
)
def test_set_means_what_it_means_to_helm(
    expression: str, chart: Path, env: dict[str, str], helm: str
) -> None:
    """Each --set rendered by `helm template --set` itself and by `daert deploy --dry-run`
    (through pyhelm3, which sends values as JSON on stdin, where integers would become
    floats and `{}` an empty list): the same values reach the templates."""
    by_helm = subprocess.run(
        [helm, "template", "daert", str(chart), "--namespace", "daert", "--set", expression],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    by_daert = daert("deploy", "--chart", chart, "--dry-run", "--set", expression, env=env)
    assert by_daert.returncode == 0, by_daert.stderr
    assert configmap_data(by_daert.stdout) == configmap_data(by_helm.stdout)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--set", "greeting"], "expected KEY=VALUE"),
        (["--set", "=value"], "expected KEY=VALUE"),
        (["--set", "a=1,b"], "expected KEY=VALUE"),
        (["--set-string", "a"], "--set-string 'a': expected KEY=VALUE"),
        (["-f", "missing.yaml"], "values file missing.yaml: not found"),
        (["-f", "list.yaml"], "must be a YAML mapping, not list"),
        (["-f", "broken.yaml"], "not valid YAML"),
        (["--chart", "no-such-chart"], "chart no-such-chart: not found"),
        (["--chart", "not-a-chart"], "not a chart (no Chart.yaml in the folder)"),
        (["--timeout", "ten minutes"], "invalid duration 'ten minutes'"),
        (["--release", "Bad_Name"], "invalid release name 'Bad_Name'"),
        (["-n", "UPPER"], "invalid namespace 'UPPER'"),
        (["--dry-run=server"], "invalid choice: 'server'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    arguments: list[str], message: str, chart: Path, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("key: [unclosed\n")
    (tmp_path / "not-a-chart").mkdir()
    if "--chart" not in arguments:
        arguments = ["--chart", str(chart), *arguments]
    done = daert("deploy", *arguments, "--dry-run", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stdout == ""


def test_a_template_error_is_helms_message_and_exit_1(chart: Path, env: dict[str, str]) -> None:
    (chart / "templates" / "required.yaml").write_text(
        '{{ required "image.tag is required" .Values.image }}\n'
    )
    done = daert("deploy", "--chart", chart, "--dry-run", env=env)
    assert done.returncode == 1
    assert "helm failed: Error: execution error at (mini/templates/required.yaml:" in done.stderr
    assert "image.tag is required" in done.stderr


def test_a_set_helm_cannot_parse_is_helms_message_and_exit_1(
    chart: Path, env: dict[str, str]
) -> None:
    done = daert("deploy", "--chart", chart, "--dry-run", "--set", "a[x]=1", env=env)
    assert done.returncode == 1
    assert "helm failed: Error: failed parsing --set data: error parsing index" in done.stderr


def test_kube_version_reaches_the_offline_render(chart: Path, env: dict[str, str]) -> None:
    done = daert("deploy", "--chart", chart, "--dry-run", "--kube-version", "1.31.2", env=env)
    assert done.returncode == 0, done.stderr
    assert configmap_data(done.stdout)["kube-version"] == "v1.31.2"


def test_missing_helm_is_a_clear_error(
    chart: Path, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = daert("deploy", "--chart", chart, "--dry-run", env=env | {"DAERT_HELM": "/no/helm"})
    assert done.returncode == 2
    assert "DAERT_HELM=/no/helm: no such executable file" in done.stderr
    done = daert("status", env=env | {"DAERT_HELM": str(chart / "Chart.yaml")})
    assert done.returncode == 2 and "no such executable file" in done.stderr

    # Neither $DAERT_HELM, nor .tools/bin/helm here or in the checkout, nor helm on PATH.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(deploy, "CHECKOUT", tmp_path)
    with pytest.raises(deploy.UsageError, match="helm not found: set DAERT_HELM"):
        deploy.find_helm({"PATH": str(tmp_path)})


def test_helm_is_found_through_daert_helm_then_tools_then_path(
    helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert deploy.find_helm({"DAERT_HELM": helm}) == helm
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(deploy, "CHECKOUT", tmp_path / "elsewhere")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "helm").symlink_to(helm)
    assert deploy.find_helm({"PATH": str(bin_dir)}) == str(bin_dir / "helm")
    tools = tmp_path / ".tools" / "bin"
    tools.mkdir(parents=True)
    (tools / "helm").symlink_to(helm)
    assert deploy.find_helm({"PATH": str(bin_dir)}) == str(Path(helm).resolve())


@pytest.mark.parametrize(
    "arguments",
    [
        ["deploy", "--wait", "--atomic", "--create-namespace", "--timeout", "90s"],
        ["deploy", "--dry-run=cluster"],
        ["status"],
        ["uninstall", "--wait"],
    ],
)
def test_without_a_cluster_helm_says_so_and_daert_exits_1(
    arguments: list[str], chart: Path, env: dict[str, str]
) -> None:
    if arguments[0] == "deploy":
        arguments = [*arguments, "--chart", str(chart)]
    done = daert(*arguments, env=env)
    assert done.returncode == 1, done.stderr
    assert "helm failed: Error: Kubernetes cluster unreachable" in done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert done.stdout == ""


def test_deploy_progress_names_the_release_and_the_wait(chart: Path, env: dict[str, str]) -> None:
    done = daert("deploy", "--chart", chart, "--atomic", "--timeout", "2m", env=env)
    assert (
        "[daert deploy] installing or upgrading release daert in namespace daert with "
        "mini-0.1.0 (waiting for readiness), timeout 2m ..."
    ) in done.stderr


def test_the_stack_chart_renders_with_its_defaults(env: dict[str, str]) -> None:
    """`daert deploy --dry-run` from the checkout: the default chart is charts/daert."""
    assert (ROOT / "charts" / "daert" / "Chart.yaml").is_file(), "charts/daert is missing"
    done = daert("deploy", "--dry-run", "--kube-version", "1.32", env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    kinds = {doc["kind"] for doc in rendered(done.stdout)}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds


# ------------------------------------------------------------------------------ status output


def _pod(name: str, phase: str, ready: list[bool], restarts: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": f"c{i}"} for i in range(len(ready))]},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": f"c{i}", "ready": r, "restartCount": restarts} for i, r in enumerate(ready)
            ],
        },
    }


def _pod_list(*pods: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": list(pods)}


def test_status_lists_workloads_and_pods_from_helm_show_resources() -> None:
    # The shape of `helm status --show-resources -o json`'s info.resources (helm's
    # kube.Client.Get: "<version>/<Kind>" keys, related pods as PodLists under "v1/Pod(related)").
    resources = {
        "v1/Deployment": [
            {
                "kind": "Deployment",
                "metadata": {"name": "daert-embedding"},
                "spec": {"replicas": 2},
                "status": {"readyReplicas": 1},
            }
        ],
        "v1/StatefulSet": [
            {"kind": "StatefulSet", "metadata": {"name": "daert-pgvector"}, "spec": {}}
        ],
        "v1/Service": [{"kind": "Service", "metadata": {"name": "daert-embedding"}}],
        # One PodList per workload; the StatefulSet has no pods yet, and a pod another
        # selector (a Service's) also matches is listed once.
        "v1/Pod(related)": [
            _pod_list(
                _pod("daert-embedding-def", "Pending", [False], 3),
                _pod("daert-embedding-abc", "Running", [True], 0),
            ),
            _pod_list(),
            _pod_list(_pod("daert-embedding-abc", "Running", [True], 0)),
        ],
    }
    lines = deploy.describe_live_resources(resources)
    assert lines[0] == "workloads:"
    assert lines[1].split() == ["Deployment/daert-embedding", "ready", "1/2"]
    assert lines[2].split() == ["StatefulSet/daert-pgvector", "ready", "0/1"]
    assert lines[3] == "pods:"
    assert lines[4].split() == ["daert-embedding-abc", "Running", "ready", "1/1", "restarts", "0"]
    assert lines[5].split() == ["daert-embedding-def", "Pending", "ready", "0/1", "restarts", "3"]
    assert deploy.describe_live_resources({}) == ["workloads:", "  (none)", "pods:", "  (none)"]


def test_workloads_from_the_manifest() -> None:
    manifest = [
        {"kind": "Deployment", "metadata": {"name": "a"}},
        None,
        {"kind": "ConfigMap", "metadata": {"name": "b"}},
        {"kind": "Job", "metadata": {"name": "c"}},
    ]
    assert deploy.workloads_from_manifest(manifest) == ["Deployment/a", "Job/c"]


def test_long_work_reports_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(deploy, "PROGRESS_EVERY_S", 0.05)
    result = asyncio.run(deploy._with_progress("deploy", "waiting", asyncio.sleep(0.3, "done")))
    assert result == "done"
    stderr = capsys.readouterr().err
    assert stderr.startswith("[daert deploy] waiting ...\n")
    assert "[daert deploy] still waiting (0s)" in stderr


FAKE_HELM = """\
#!{python}
# A stand-in for helm with a deployed release: `helm status` answers as helm 3 does.
import json, sys
args = sys.argv[1:]
if args[0] == "version":
    print("v3.21.4", end="")
    sys.exit(0)
assert args[0] == "status" and args[1] == "daert", args
release = {{
    "name": "daert",
    "namespace": "prod",
    "version": 4,
    "info": {{
        "first_deployed": "2025-01-02T03:04:05.123456789Z",
        "last_deployed": "2025-02-03T04:05:06.123456789Z",
        "deleted": "",
        "description": "Upgrade complete",
        "status": "deployed",
        "notes": "reach the gateway at ...",
    }},
    "chart": {{"metadata": {{"apiVersion": "v2", "name": "daert", "version": "0.1.0",
                           "appVersion": "0.1.0"}}}},
    "manifest": "---\\nkind: Deployment\\nmetadata:\\n  name: daert-embedding\\n",
}}
if "--show-resources" in args:
    if {forbid_resources}:
        sys.stderr.write('Error: pods is forbidden: User "ci" cannot list resource "pods"\\n')
        sys.exit(1)
    release["info"]["resources"] = {{
        "v1/Deployment": [{{"kind": "Deployment", "metadata": {{"name": "daert-embedding"}},
                            "spec": {{"replicas": 2}}, "status": {{"readyReplicas": 2}}}}],
        "v1/Pod(related)": [{{"kind": "PodList", "metadata": {{}}, "items": [
            {{"kind": "Pod", "metadata": {{"name": "daert-embedding-1"}},
             "spec": {{"containers": [{{"name": "server"}}]}},
             "status": {{"phase": "Running", "containerStatuses": [
                 {{"ready": True, "restartCount": 1}}]}}}}]}}],
    }}
print(json.dumps(release))
"""


@pytest.mark.parametrize("forbid_resources", [False, True])
def test_status_shows_the_release_its_workloads_and_pods(
    forbid_resources: bool, env: dict[str, str], tmp_path: Path
) -> None:
    fake = tmp_path / "helm"
    fake.write_text(FAKE_HELM.format(python=sys.executable, forbid_resources=forbid_resources))
    fake.chmod(0o755)
    done = daert("status", "-n", "prod", env=env | {"DAERT_HELM": str(fake)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:7] == [
        "release   daert (namespace prod)",
        "revision  4",
        "status    deployed",
        "updated   2025-02-03 04:05:06 UTC",
        "chart     daert-0.1.0",
        "app       0.1.0",
        "note      Upgrade complete",
    ]
    if forbid_resources:
        assert lines[7:] == [
            "workloads (from the release manifest):",
            "  Deployment/daert-embedding",
            "pods: not available, they need read access to the cluster (Error: pods is "
            'forbidden: User "ci" cannot list resource "pods")',
        ]
    else:
        assert [line.split() for line in lines[7:]] == [
            ["workloads:"],
            ["Deployment/daert-embedding", "ready", "2/2"],
            ["pods:"],
            ["daert-embedding-1", "Running", "ready", "1/1", "restarts", "1"],
        ]
