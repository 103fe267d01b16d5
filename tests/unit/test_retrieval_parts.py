"""The retrieval service's backend-independent parts: the filter parser, its SQL compiler
and hybrid fusion."""

from __future__ import annotations

from typing import Any

import pytest
from daert.retrieval.backends.pg_filter import compile_filter
from daert.retrieval.filters import And, Equals, Exists, Not, Or, Range, parse_filter
from daert.retrieval.fusion import RRF_K, Fusion, fuse
from daert.retrieval.model import ChunkRecord, ScoredChunk
from daert.retrieval.service import _both
from daert.runtime.errors import InvalidArgument, Unavailable


def test_parse_builds_the_tree() -> None:
    tree = parse_filter(
        {
            "lang": "en",
            "year": {"range": {"gte": 2020, "lt": 2024}},
            "or": [{"tags": {"in": ["a", "b"]}}, {"not": {"draft": {"exists": True}}}],
            "author.name": {"ne": "x"},
        }
    )
    assert tree == And(
        (
            Equals(("lang",), ("en",)),
            Range(("year",), (("gte", 2020), ("lt", 2024))),
            Or((Equals(("tags",), ("a", "b")), Not(Exists(("draft",))))),
            Not(Equals(("author", "name"), ("x",))),
        )
    )
    assert parse_filter({}) is None


def test_parse_limits_depth_and_size() -> None:
    deep: dict[str, Any] = {"a": 1}
    for _ in range(20):
        deep = {"not": deep}
    with pytest.raises(InvalidArgument, match="deeper"):
        parse_filter(deep)
    with pytest.raises(InvalidArgument, match="more than"):
        parse_filter({"or": [{f"k{i}": i} for i in range(300)]})


def _sql_text(filter: dict[str, Any]) -> tuple[str, list[Any]]:
    tree = parse_filter(filter)
    assert tree is not None
    composed, params = compile_filter(tree)
    # Render without a connection: every placeholder stays a placeholder.
    return composed.as_string(None), params


@pytest.mark.parametrize(
    "hostile",
    ["x'); DROP TABLE t; --", 'a"b', "%(k)s", "$1", "{}", "\\", "a) OR (1=1"],
)
def test_keys_and_values_never_reach_the_sql_text(hostile: str) -> None:
    for raw in (
        {hostile: "v"},
        {"k": hostile},
        {hostile: {"range": {"gt": hostile}}},
        {hostile: {"exists": True}},
        {"k": {"in": [hostile, 1]}},
    ):
        text, params = _sql_text(raw)
        assert hostile not in text
        assert params, raw


def test_placeholders_match_parameters() -> None:
    text, params = _sql_text(
        {"a": {"in": [1, 2]}, "b": {"range": {"gt": 1, "lte": 5}}, "c": {"exists": False}}
    )
    assert text.count("%s") == len(params) == 4 + 3 + 1


def _ranking(*ids: str, start: float = 1.0) -> list[ScoredChunk]:
    return [
        ScoredChunk(ChunkRecord(id=i, document_id="", text=i), start - n * 0.1)
        for n, i in enumerate(ids)
    ]


def test_rrf_rewards_agreement_and_respects_weights() -> None:
    fused = fuse(_ranking("a", "b", "c"), _ranking("c", "d"), 0.5, Fusion.RRF)
    assert [hit.chunk.id for hit in fused] == ["c", "a", "b", "d"]
    c = fused[0]
    assert c.score == pytest.approx(0.5 / (RRF_K + 3) + 0.5 / (RRF_K + 1))
    assert (c.vector_rank, c.keyword_rank) == (3, 1)
    assert fused[1].keyword_rank is None
    keyword_only = fuse(_ranking("a", "b"), _ranking("b", "a"), 0.0, Fusion.RRF)
    assert [hit.chunk.id for hit in keyword_only] == ["b", "a"]


def test_relative_score_fusion_normalises_each_list() -> None:
    fused = fuse(
        _ranking("a", "b", start=0.9), _ranking("b", "c", start=12.0), 0.5, Fusion.RELATIVE_SCORE
    )
    scores = {hit.chunk.id: hit.score for hit in fused}
    assert scores == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})


async def test_a_service_error_under_both_searches_is_raised_as_itself() -> None:
    # A database restart breaks both hybrid searches at once: the caller must see
    # UNAVAILABLE (which clients retry), not the task group's ExceptionGroup (INTERNAL).
    async def lost() -> list[ScoredChunk]:
        raise Unavailable("PostgreSQL connection failed")

    with pytest.raises(Unavailable, match="connection failed"):
        await _both(lost(), lost())

    async def found() -> list[ScoredChunk]:
        return []

    assert await _both(found(), found()) == ([], [])
