"""LoRA router settings: defaults, and bad values stopped at start-up with their variable."""

from __future__ import annotations

import json

import pytest
from daert.lora.config import LoraSettings
from daert.runtime.settings import ConfigError, load_settings

VLLM = {"name": "vllm-0", "url": "http://vllm-0:8000/", "kind": "vllm", "base_model": "llama"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("DSN", "REPLICAS", "DEFAULT_BASE_MODEL", "PORT", "METRICS_PORT"):
        monkeypatch.delenv(f"DAERT_LORA_{name}", raising=False)
    monkeypatch.setenv("DAERT_LORA_DSN", "postgresql://lora@db/lora")
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DAERT_LORA_REPLICAS", json.dumps([VLLM]))
    settings = load_settings(LoraSettings)
    assert (settings.port, settings.metrics_port) == (50057, 9057)
    replica = settings.replicas[0]
    assert replica.url == "http://vllm-0:8000"  # trailing slash dropped
    assert replica.max_resident_adapters == 8
    assert settings.base_model == "llama"  # the first replica's, when none is set
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DAERT_LORA_DSN", None, "needs DAERT_LORA_DSN"),
        ("DAERT_LORA_REPLICAS", "not json", "DAERT_LORA_REPLICAS: not valid JSON"),
        ("DAERT_LORA_REPLICAS", json.dumps([VLLM, VLLM]), "names repeated: vllm-0"),
        (
            "DAERT_LORA_REPLICAS",
            json.dumps([{**VLLM, "url": "vllm-0:8000"}]),
            "DAERT_LORA_REPLICAS[0][url]",
        ),
        (
            "DAERT_LORA_REPLICAS",
            json.dumps([{**VLLM, "kind": "triton"}]),
            "DAERT_LORA_REPLICAS[0][kind]",
        ),
        (
            "DAERT_LORA_REPLICAS",
            json.dumps([{**VLLM, "name": "has space"}]),
            "DAERT_LORA_REPLICAS[0][name]",
        ),
        (
            "DAERT_LORA_REPLICAS",
            json.dumps([{**VLLM, "adapters": ["sql"]}]),
            "`adapters` is for tgi replicas only",
        ),
        (
            "DAERT_LORA_REPLICAS",
            json.dumps([{**VLLM, "max_resident_adapters": 0}]),
            "DAERT_LORA_REPLICAS[0][max_resident_adapters]",
        ),
        ("DAERT_LORA_DEFAULT_BASE_MODEL", "gpt-2", "is served by no replica"),
        ("DAERT_LORA_SPILL_FACTOR", "0.5", "DAERT_LORA_SPILL_FACTOR"),
        ("DAERT_LORA_MIN_SCORE", "2", "DAERT_LORA_MIN_SCORE"),
    ],
)
def test_bad_values_are_named(
    clean_env: pytest.MonkeyPatch, variable: str, value: str | None, message: str
) -> None:
    if variable != "DAERT_LORA_REPLICAS":
        clean_env.setenv("DAERT_LORA_REPLICAS", json.dumps([VLLM]))
    if value is None:
        clean_env.delenv(variable)
    else:
        clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(LoraSettings)
    assert message in str(caught.value)
