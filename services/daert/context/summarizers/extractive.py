"""EXTRACTIVE: no LLM. The summary is the most salient sentences of the turns (and of the
summary so far), quoted verbatim in their order, chosen by maximal marginal relevance: a
sentence's relevance is half how central it is (cosine to the centroid of everything said,
over embeddings from the embedding service) and half how informative (the mean inverse
document frequency of its words among all the sentences: names, numbers and identifiers
are rare, small talk repeats), less its similarity to what is already chosen, so distinct
facts win over repetition."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import grpc
import numpy as np
import numpy.typing as npt

from daert.clients import EmbeddingClient
from daert.context.messages import Message
from daert.context.summarizers.base import Condensing, Summary, transcript
from daert.runtime.errors import downstream_error
from daert.v1 import context_pb2, embedding_pb2

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")
# Relevance against redundancy in the marginal-relevance score.
_RELEVANCE_WEIGHT = 0.6


def sentences(previous: str, turns: Sequence[Message]) -> list[str]:
    """Candidate lines: the earlier summary's lines, then each turn's sentences quoted with
    the turn's author."""
    lines = [line for line in previous.splitlines() if line.strip()]
    for line in transcript(turns):
        author, _, text = line.partition(": ")
        lines += [f"{author}: {s}" for s in _SENTENCE_END.split(text) if s.strip()]
    return lines


def informativeness(lines: Sequence[str]) -> npt.NDArray[np.float32]:
    """Each line's mean inverse document frequency over `lines`, scaled to [0, 1]."""
    words = [set(_WORD.findall(line.partition(": ")[2].lower())) for line in lines]
    frequency = Counter(word for line_words in words for word in line_words)
    scores = np.asarray(
        [
            sum(math.log(len(lines) / frequency[w]) for w in line_words) / len(line_words)
            if line_words
            else 0.0
            for line_words in words
        ],
        dtype=np.float32,
    )
    top = float(scores.max()) if len(scores) else 0.0
    return scores / top if top > 0 else scores


class ExtractiveSummarizer:
    strategy = context_pb2.COMPRESSION_STRATEGY_EXTRACTIVE

    def __init__(self, embedding_model: str, timeout_s: float) -> None:
        self._model = embedding_model
        self._timeout_s = timeout_s
        self._client: EmbeddingClient | None = None  # made on first use, inside the loop

    async def fold(
        self,
        previous: str,
        turns: Sequence[Message],
        max_tokens: int,
        job: Condensing,
    ) -> Summary:
        lines = sentences(previous, turns)
        if not lines:
            return Summary("")
        costs = [tokens + 1 for tokens in await job.tokenizer.count_parts(lines)]  # + newline
        if sum(costs) <= max_tokens:
            return Summary("\n".join(lines))
        vectors = np.asarray(await self._embed(lines), dtype=np.float32)
        centroid = vectors.mean(axis=0)
        centrality = vectors @ (centroid / max(float(np.linalg.norm(centroid)), 1e-12))
        relevance = 0.5 * centrality + 0.5 * informativeness(lines)
        chosen: list[int] = []
        redundancy = np.zeros(len(lines), dtype=np.float32)
        open_ = np.ones(len(lines), dtype=bool)
        spent = 0
        while open_.any():
            scores = _RELEVANCE_WEIGHT * relevance - (1 - _RELEVANCE_WEIGHT) * redundancy
            best = int(np.argmax(np.where(open_, scores, -np.inf)))
            open_[best] = False
            if spent + costs[best] > max_tokens:
                continue  # too long for what is left; a shorter one may still fit
            chosen.append(best)
            spent += costs[best]
            redundancy = np.maximum(redundancy, vectors @ vectors[best])
        return Summary("\n".join(lines[i] for i in sorted(chosen)))

    async def _embed(self, lines: list[str]) -> list[list[float]]:
        if self._client is None:
            # DAERT_EMBEDDING_TARGET names the service; one retry.
            self._client = EmbeddingClient(timeout_s=self._timeout_s, max_attempts=2)
        try:
            return await self._client.embed_texts(
                lines, model=self._model, input_type=embedding_pb2.INPUT_TYPE_DOCUMENT
            )
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(
                exc, "extractive summaries", self._client.service, self._client.target
            ) from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
