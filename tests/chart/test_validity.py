"""helm lint --strict for every profile, and every rendered manifest of every profile checked
against the Kubernetes JSON schemas of 1.29 to 1.32 (offline, kubernetes-validate)."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.chart.conftest import ALL_ON, CHART, OWN_SERVERS, PROFILES, render, run_helm

KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32"]
# Kinds from CRDs: the Kubernetes schemas do not know them.
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com CRD (Prometheus Operator)"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_helm_lint_strict(profile: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in PROFILES[profile]:
        args += ["-f", str(path)]
    out = run_helm(*args)
    assert "0 chart(s) failed" in out


def _profiles() -> dict[str, list[dict[str, Any]]]:
    rendered = {name: render(files=files) for name, files in PROFILES.items()}
    rendered["all-on"] = render(ALL_ON)
    rendered["all-on-prod"] = render(ALL_ON, files=PROFILES["prod"])
    # Generation and context on your own servers, without the chart's LLM server.
    rendered["own-servers-prod"] = render(OWN_SERVERS, files=PROFILES["prod"])
    # The LLM's model from the model cache instead of the model image.
    rendered["llm-from-cache"] = render(
        {"llm": {"model": {"source": "modelCache"}}, "modelCache": {"type": "pvc"}}
    )
    return {name: r.docs for name, r in rendered.items()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_kubernetes_schemas(version: str) -> None:
    checked = 0
    skipped: set[str] = set()
    for profile, docs in _profiles().items():
        assert docs, profile
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                skipped.add(f"{doc['kind']}: {CRD_KINDS[doc['kind']]}")
                continue
            where = f"{profile}: {doc['kind']}/{doc['metadata']['name']} on {version}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{where}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: no schema for {doc['apiVersion']} {doc['kind']}")
            checked += 1
    # The CRD kinds were really rendered (all-on turns the ServiceMonitors on) and skipped.
    assert skipped == {f"ServiceMonitor: {CRD_KINDS['ServiceMonitor']}"}
    assert checked > 100


def test_the_validator_catches_a_bad_manifest() -> None:
    """The check above can fail: an unknown field and a wrong type are reported."""
    deployment = copy.deepcopy(render().get("Deployment", "rel-daert-embedding"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.32", strict=True)
    deployment = copy.deepcopy(render().get("Deployment", "rel-daert-embedding"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29", strict=True)
