"""In-process cross-encoder (sentence-transformers `CrossEncoder`), off the event loop."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from daert.rerank.backends.base import ModelInfo, Scored, model_batcher
from daert.rerank.config import ModelConfig, RerankSettings
from daert.runtime.errors import Unavailable

Pair = tuple[str, str]
# One pair's result: its score and the tokens the model read.
PairScore = tuple[float, int]


class CrossEncoderBackend:
    kind = "cross-encoder"

    def __init__(self, config: ModelConfig, settings: RerankSettings) -> None:
        self._config = config
        self._model: Any = None
        self._info: ModelInfo | None = None
        # One inference at a time: torch already uses every core for a batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        self._batcher = model_batcher(config, settings, self._run_batch)

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    async def start(self) -> None:
        # Local folders only: never reach for a model hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)
        self._info = ModelInfo(max_input_tokens=int(self._model.max_seq_length))
        self._batcher.start()

    def _load(self) -> Any:
        import torch
        from sentence_transformers import CrossEncoder

        path = self._config.path
        assert path is not None  # enforced by ModelConfig
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {self._config.name!r}: no model folder at {path}")
        # An explicit sigmoid: a saved model may configure another activation (many
        # published rerankers save Identity, i.e. raw logits), and scores must be in [0, 1].
        model = CrossEncoder(
            path,
            device=self._config.device,
            max_length=self._config.max_input_tokens,
            activation_fn=torch.nn.Sigmoid(),
        )
        if model.num_labels != 1:
            raise ValueError(
                f"model {self._config.name!r} has {model.num_labels} labels; "
                "a reranker scores with exactly one"
            )
        return model

    async def ready(self) -> bool:
        return self._model is not None

    async def score(self, query: str, documents: list[str]) -> Scored:
        if self._model is None:
            raise Unavailable(f"model {self._config.name!r} is still loading")
        rows = await self._batcher.submit(None, [(query, d) for d in documents])
        return Scored(scores=[s for s, _ in rows], tokens=sum(n for _, n in rows))

    async def _run_batch(self, _: None, pairs: list[Pair]) -> list[PairScore]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict, pairs)

    def _predict(self, pairs: list[Pair]) -> list[PairScore]:
        # Identical pairs are scored once, so they tie exactly (different padding in
        # different forward passes could otherwise split them by a rounding error).
        unique = list(dict.fromkeys(pairs))
        scores = self._model.predict(
            unique,
            batch_size=self._config.forward_batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        # The same tokenizer settings the model reads with: pairs cut to max_seq_length.
        encoded = self._model.tokenizer(
            [q for q, _ in unique],
            [d for _, d in unique],
            truncation=True,
            max_length=self._model.max_seq_length,
        )
        by_pair = {
            pair: (float(score), len(ids))
            for pair, score, ids in zip(unique, scores, encoded["input_ids"], strict=True)
        }
        return [by_pair[pair] for pair in pairs]

    async def close(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
