"""Ingestion params: defaults, errors that name the field, and the trigger-form specs."""

from __future__ import annotations

from typing import Any

import pytest
from daert.ingest.errors import InvalidParams
from daert.ingest.params import IngestParams, param_specs, parse_params

VALID = {"source": "/data/docs", "collection": "docs"}


def test_defaults() -> None:
    params = parse_params(VALID)
    assert (params.mode, params.chunk_tokens, params.chunk_overlap_tokens) == (
        "incremental",
        200,
        32,
    )
    assert (params.batch_size, params.dimensions, params.tenant, params.metadata) == (50, 0, "", {})
    assert params.sources == ["/data/docs"]
    assert parse_params({**VALID, "source": ["a", "b"]}).sources == ["a", "b"]
    assert parse_params(params) is params


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"collection": "Docs"}, "collection"),
        ({"collection": "x" * 64}, "collection"),
        ({"source": []}, "source"),
        ({"source": ["ok", " "]}, "source"),
        ({"dimensions": -1}, "dimensions"),
        ({"chunk_overlap_tokens": 200}, "chunk_overlap_tokens"),
        ({"chunk_tokens": 16, "chunk_overlap_tokens": 20}, "chunk_overlap_tokens"),
        ({"mode": "mirror"}, "mode"),
        ({"batch_size": 0}, "batch_size"),
        ({"metadata": {"title": "mine"}}, "metadata"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_params_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        parse_params({**VALID, **change})
    assert f"\n  {field}:" in str(caught.value)


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(InvalidParams) as caught:
        parse_params({})
    assert "source: Field required" in str(caught.value)
    assert "collection: Field required" in str(caught.value)


def test_reserved_metadata_key_is_named() -> None:
    with pytest.raises(InvalidParams, match="'ingest_source' is set by ingestion"):
        parse_params({**VALID, "metadata": {"team": "a", "ingest_source": "x"}})
    assert parse_params({**VALID, "metadata": {"team": "a"}}).metadata == {"team": "a"}


def test_param_specs_follow_the_model() -> None:
    specs = param_specs()
    assert list(specs) == list(IngestParams.model_fields)
    assert "default" not in specs["collection"] and "pattern" in specs["collection"]
    assert specs["source"]["type"] == ["string", "array"]
    assert specs["mode"]["enum"] == ["incremental", "full", "sync"]
    assert specs["mode"]["default"] == "incremental"
    assert specs["chunk_tokens"] == {
        "default": 200,
        "description": specs["chunk_tokens"]["description"],
        "minimum": 8,
        "title": "Chunk Tokens",
        "type": "integer",
    }
    assert specs["metadata"]["type"] == "object" and specs["metadata"]["default"] == {}
    assert all(spec["description"] for spec in specs.values())
