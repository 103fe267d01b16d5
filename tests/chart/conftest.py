"""Chart tests: charts/daert rendered with the real helm (built by `make setup`), the YAML
parsed and asserted on, in the style of the apache/airflow chart's tests."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, TOOLS

CHART = REPO / "charts" / "daert"
FULL_CHART = REPO / "charts" / "daert-full"
HELM = TOOLS / "helm"
RELEASE = "rel"
NAMESPACE = "ns"
FULLNAME = f"{RELEASE}-daert"

# Every service the chart knows, with its default gRPC (gateway: HTTP) and metrics ports.
SERVICES = [
    "generation",
    "embedding",
    "retrieval",
    "rerank",
    "sandbox",
    "context",
    "lora",
    "gateway",
]
# The services on by default: all of them.
DEFAULT_ON = list(SERVICES)

# Values that switch every service on (and every optional object the chart has).
ALL_ON: dict[str, Any] = {
    **{name: {"enabled": True} for name in SERVICES},
    "metrics": {"serviceMonitor": {"enabled": True}},
}

# Generation and context on the user's own servers, without the chart's LLM server (llm).
OWN_SERVERS: dict[str, Any] = {
    "llm": {"enabled": False},
    "generation": {
        "config": {"models": [{"name": "llama", "backend": "openai", "url": "http://vllm:8000"}]}
    },
    "context": {
        "config": {"tokenizers": [{"name": "llama", "kind": "huggingface", "path": "/models/t"}]}
    },
}

PROFILES = {
    "default": [],
    "dev": [CHART / "values-dev.yaml"],
    "prod": [CHART / "values-prod.yaml"],
}


class HelmError(Exception):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(stderr)
        self.returncode = returncode
        self.stderr = stderr


def helm_binary() -> Path:
    if not HELM.exists():
        pytest.fail(f"helm is missing at {HELM}: run `make setup` (it builds helm with go install)")
    return HELM


def run_helm(*args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(
        [str(helm_binary()), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise HelmError(proc.returncode, proc.stderr)
    return proc.stdout


@dataclass(frozen=True)
class Rendered:
    docs: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.of(kind)}

    def component(self, component: str) -> list[dict[str, Any]]:
        return [
            d
            for d in self.docs
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]


def _render(
    values_files: Iterable[Path],
    values_yaml: str,
    sets: tuple[str, ...],
    chart: Path,
    extra: tuple[str, ...] = (),
) -> Rendered:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["-f", str(path)]
    if values_yaml:
        # helm reads "-" as stdin only once; a file is simpler.
        tmp = Path(tempfile.gettempdir()) / "daert-chart-values"
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / f"values-{hashlib.sha256(values_yaml.encode()).hexdigest()[:16]}.yaml"
        path.write_text(values_yaml)
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    args += list(extra)
    out = run_helm(*args)
    docs = [d for d in yaml.safe_load_all(out) if d]
    return Rendered(docs)


@functools.cache
def _render_cached(
    files: tuple[str, ...], values_yaml: str, sets: tuple[str, ...], chart: str
) -> Rendered:
    return _render([Path(f) for f in files], values_yaml, sets, Path(chart))


def render(
    values: dict[str, Any] | None = None,
    *,
    files: Iterable[Path] = (),
    sets: Iterable[str] = (),
    chart: Path = CHART,
) -> Rendered:
    """`helm template` of the chart with these values (cached: renders are pure)."""
    values_yaml = yaml.safe_dump(values) if values else ""
    return _render_cached(tuple(str(f) for f in files), values_yaml, tuple(sets), str(chart))


def render_error(
    values: dict[str, Any] | None = None, *, sets: Iterable[str] = (), files: Iterable[Path] = ()
) -> HelmError:
    """Render values that must be refused; returns the error."""
    with pytest.raises(HelmError) as info:
        _render(list(files), yaml.safe_dump(values) if values else "", tuple(sets), CHART)
    return info.value


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@pytest.fixture(scope="session")
def render_fn() -> Callable[..., Rendered]:
    return render


def copy_chart(dest: Path) -> Path:
    target = dest / "daert"
    shutil.copytree(CHART, target)
    return target


# The restricted Pod Security Standard, as every container of the chart sets it.
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
