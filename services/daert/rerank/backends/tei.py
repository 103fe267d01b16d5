"""Hugging Face text-embeddings-inference serving a reranker: `POST /rerank`, `GET /health`,
`GET /info`.

TEI answers `[{"index", "score"}]` sorted by score; with `raw_scores: false` it has already
passed the logit through a sigmoid, so scores are in [0, 1]. It refuses more than
`max_client_batch_size` texts per call (from /info), so larger calls go in pieces, at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from daert.rerank.backends.base import ModelInfo, Scored
from daert.rerank.config import ModelConfig
from daert.runtime.errors import ServiceError, Unavailable
from daert.runtime.upstream import http_client, json_body, send

log = logging.getLogger("daert.rerank")

LABEL = "TEI"


class TeiBackend:
    kind = "tei"

    def __init__(self, config: ModelConfig) -> None:
        assert config.url is not None  # enforced by ModelConfig
        self._config = config
        self._url = config.url
        self._http = http_client(config.url, config.timeout_s)
        self._info: ModelInfo | None = None
        self._max_client_batch_size = 32  # TEI's default, replaced by /info's value

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    async def start(self) -> None:
        """Nothing to load: TEI may come up after us; `ready` keeps asking."""

    async def ready(self) -> bool:
        try:
            await self._request("GET", "/health")  # 503 while TEI is still loading
            if self._info is None:
                info = json_body(await self._request("GET", "/info"), LABEL)
                if "reranker" not in (info.get("model_type") or {}):
                    log.warning(
                        "TEI at %s serves %s, not a reranker", self._url, info.get("model_type")
                    )
                    return False
                self._max_client_batch_size = int(info.get("max_client_batch_size") or 32)
                limit = self._config.max_input_tokens or int(info.get("max_input_length") or 0)
                self._info = ModelInfo(max_input_tokens=limit)
                log.info(
                    "upstream model ready",
                    extra={
                        "model": self._config.name,
                        "url": self._url,
                        "tei_model": info.get("model_id"),
                    },
                )
            return True
        except ServiceError as exc:
            log.warning("%s not ready: %s", LABEL, exc.message)
            return False

    async def score(self, query: str, documents: list[str]) -> Scored:
        if self._info is None:
            raise Unavailable(f"{LABEL} at {self._url} has not answered yet")
        step = self._max_client_batch_size
        pieces = [
            asyncio.ensure_future(self._rerank(query, documents[start : start + step]))
            for start in range(0, len(documents), step)
        ]
        try:
            answers = await asyncio.gather(*pieces)
        except BaseException:
            for piece in pieces:  # one failed (or the caller left): the others are moot
                piece.cancel()
            raise
        scores: list[float] = []
        tokens = 0
        for piece_scores, piece_tokens in answers:
            scores.extend(piece_scores)
            tokens += piece_tokens
        return Scored(scores=scores, tokens=tokens)

    async def _rerank(self, query: str, texts: list[str]) -> tuple[list[float], int]:
        """Scores for one piece, back in `texts` order, and the tokens TEI reports."""
        body = {
            "query": query,
            "texts": texts,
            "truncate": True,
            "raw_scores": False,
            "return_text": False,
        }
        response = await self._request("POST", "/rerank", json=body)
        scores: dict[int, float] = {}
        for rank in json_body(response, LABEL):
            scores[int(rank["index"])] = float(rank["score"])
        if sorted(scores) != list(range(len(texts))):
            raise Unavailable(f"{LABEL} ranked indexes {sorted(scores)} for {len(texts)} texts")
        # TEI reports what it read in the x-compute-tokens header (router/src/lib.rs).
        tokens = int(response.headers.get("x-compute-tokens") or 0)
        return [scores[i] for i in range(len(texts))], tokens

    async def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        return await send(
            self._http,
            method,
            path,
            backend=LABEL,
            url=self._url,
            invalid_field="documents",
            json=json,
        )

    async def close(self) -> None:
        await self._http.aclose()
