"""Rerank parts without a server: ordering, the BM25 term, and settings validation."""

from __future__ import annotations

import numpy as np
import pytest
from daert.rerank.backends.embedded import lexical_scores
from daert.rerank.config import RerankSettings
from daert.rerank.models import ranked
from daert.runtime.settings import ConfigError, load_settings


def test_ranked_is_best_first_with_ties_in_request_order() -> None:
    order = ranked([0.2, 0.9, 0.5, 0.9], top_n=0)
    assert [i for i, _ in order] == [1, 3, 2, 0]
    assert [score for _, score in order] == pytest.approx([0.9, 0.9, 0.5, 0.2])
    assert [i for i, _ in ranked([0.2, 0.9, 0.5, 0.9], top_n=2)] == [1, 3]
    assert len(ranked([0.1], top_n=5)) == 1


def test_ranked_orders_by_what_the_client_sees() -> None:
    # Different as float64, equal once sent as float32: request order decides.
    a, b = 0.5 + 1e-12, 0.5
    assert [i for i, _ in ranked([b, a], top_n=0)] == [0, 1]
    assert all(isinstance(score, float) for _, score in ranked([a, b], top_n=0))


def test_lexical_scores_are_normalised_by_the_best_document() -> None:
    documents = ["rotate the API keys", "rotate keys keys keys", "the cat sat on the mat"]
    scores = lexical_scores("how do I rotate API keys", documents)
    assert scores.dtype == np.float32
    assert scores.max() == 1.0
    assert scores[2] == 0.0
    assert 0 < scores.min(initial=1, where=scores > 0) < 1


@pytest.mark.parametrize(
    ("query", "documents"),
    [
        ("the of and", ["rotate keys"]),  # the query is all stopwords
        ("rotate keys", ["the", "a of"]),  # so is every document
        ("zebra", ["rotate keys"]),  # no shared term
    ],
)
def test_lexical_scores_without_a_match_are_zero(query: str, documents: list[str]) -> None:
    assert lexical_scores(query, documents).tolist() == [0.0] * len(documents)


def test_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "METRICS_PORT", "MODELS"):
        monkeypatch.delenv(f"DAERT_RERANK_{name}", raising=False)
    settings = load_settings(RerankSettings)
    assert (settings.port, settings.metrics_port) == (50054, 9054)
    [model] = settings.models
    assert (model.name, model.backend, model.lexical_weight) == ("minilm-bm25", "embedded", 0.3)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DAERT_RERANK_MODELS", '[{"name": "ce", "backend": "cross-encoder"}]', "needs `path`"),
        ("DAERT_RERANK_MODELS", '[{"name": "t", "backend": "tei"}]', "needs `url`"),
        (
            "DAERT_RERANK_MODELS",
            '[{"name": "e", "lexical_weight": 2}]',
            "MODELS[0][lexical_weight]",
        ),
        ("DAERT_RERANK_MODELS", '[{"name": "a"}, {"name": "a"}]', "repeated: a"),
        ("DAERT_RERANK_MAX_QUEUED_ITEMS", "500", "max_documents + 1 (1001)"),
        ("DAERT_RERANK_MAX_DOCUMENT_CHARS", "0", "DAERT_RERANK_MAX_DOCUMENT_CHARS"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(RerankSettings)
    assert message in str(caught.value)


def test_a_tei_model_needs_no_queue_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DAERT_RERANK_MODELS", '[{"name": "t", "backend": "tei", "url": "http://tei:8080"}]'
    )
    monkeypatch.setenv("DAERT_RERANK_MAX_QUEUED_ITEMS", "10")
    assert load_settings(RerankSettings).max_queued_items == 10
