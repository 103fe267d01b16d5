"""Typed configuration: defaults, and errors that name the environment variable."""

from __future__ import annotations

import pytest
from daert.embedding.config import EmbeddingSettings
from daert.runtime.settings import ConfigError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "METRICS_PORT", "MODELS"):
        monkeypatch.delenv(f"DAERT_EMBEDDING_{name}", raising=False)
    settings = load_settings(EmbeddingSettings)
    assert (settings.port, settings.metrics_port) == (50052, 9052)
    assert [m.name for m in settings.models] == ["all-MiniLM-L6-v2"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DAERT_EMBEDDING_PORT", "70000", "DAERT_EMBEDDING_PORT: Input should be less than"),
        ("DAERT_EMBEDDING_LOG_LEVEL", "LOUD", "DAERT_EMBEDDING_LOG_LEVEL: Input should be"),
        ("DAERT_EMBEDDING_GRACE_PERIOD_S", "-1", "DAERT_EMBEDDING_GRACE_PERIOD_S"),
        (
            "DAERT_EMBEDDING_MODELS",
            '[{"name": "a", "path": "/m"}, {"name": "a", "path": "/m"}]',
            "repeated: a",
        ),
        ("DAERT_EMBEDDING_MODELS", "[]", "DAERT_EMBEDDING_MODELS: List should have at least 1"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(EmbeddingSettings)
    assert message in str(caught.value)
