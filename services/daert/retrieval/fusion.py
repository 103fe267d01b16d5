"""Hybrid search: one ranking from a vector ranking and a keyword ranking.

Done here rather than in each backend so that HYBRID scores mean the same on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from daert.retrieval.model import ChunkRecord, ScoredChunk

# The usual RRF constant (Cormack et al., 2009): damps the head of each ranking so one
# list's first place cannot outvote agreement between the two lists.
RRF_K = 60


class Fusion(StrEnum):
    RRF = "rrf"
    RELATIVE_SCORE = "relative_score"


@dataclass
class FusedHit:
    chunk: ChunkRecord
    score: float
    vector_rank: int | None = None
    vector_score: float | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None


def fuse(
    vector: list[ScoredChunk],
    keyword: list[ScoredChunk],
    vector_weight: float,
    fusion: Fusion,
) -> list[FusedHit]:
    """Fuse two best-first rankings; ties keep the vector ranking's order."""
    hits: dict[str, FusedHit] = {}
    for rank, scored in enumerate(vector, start=1):
        hits[scored.chunk.id] = FusedHit(
            scored.chunk, 0.0, vector_rank=rank, vector_score=scored.score
        )
    for rank, scored in enumerate(keyword, start=1):
        hit = hits.setdefault(scored.chunk.id, FusedHit(scored.chunk, 0.0))
        hit.keyword_rank, hit.keyword_score = rank, scored.score

    keyword_weight = 1.0 - vector_weight
    if fusion is Fusion.RRF:
        for hit in hits.values():
            if hit.vector_rank is not None:
                hit.score += vector_weight / (RRF_K + hit.vector_rank)
            if hit.keyword_rank is not None:
                hit.score += keyword_weight / (RRF_K + hit.keyword_rank)
    else:
        vector_norm = _min_max([s.score for s in vector])
        keyword_norm = _min_max([s.score for s in keyword])
        for hit in hits.values():
            if hit.vector_score is not None:
                hit.score += vector_weight * vector_norm(hit.vector_score)
            if hit.keyword_score is not None:
                hit.score += keyword_weight * keyword_norm(hit.keyword_score)
    return sorted(hits.values(), key=lambda hit: -hit.score)


def _min_max(scores: list[float]) -> Callable[[float], float]:
    low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
    span = high - low

    def normalise(score: float) -> float:
        # A list of equal scores (or a single hit) carries no ordering: all count fully.
        return (score - low) / span if span > 0 else 1.0

    return normalise
