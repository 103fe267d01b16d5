"""In-process inference with sentence-transformers (torch), off the event loop."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from daert.embedding.backends.base import Encoded, ModelInfo
from daert.embedding.config import ModelConfig, default_model_path
from daert.runtime.errors import Unavailable


def _model_path(config: ModelConfig) -> str:
    return config.path or default_model_path()


class SentenceTransformersBackend:
    kind = "sentence-transformers"

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._model: Any = None
        self._info: ModelInfo | None = None
        # One inference at a time: torch already uses every core for a batch, and a single
        # thread keeps batches in order. The event loop never waits on it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    async def start(self) -> None:
        # Local folders only: never reach for a model hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)
        if self._config.max_input_tokens:
            self._model.max_seq_length = self._config.max_input_tokens
        self._info = ModelInfo(
            dimensions=int(self._model.get_embedding_dimension()),
            max_input_tokens=int(self._model.max_seq_length),
        )

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        path = _model_path(self._config)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {self._config.name!r}: no model folder at {path}")
        return SentenceTransformer(path, device=self._config.device)

    async def ready(self) -> bool:
        return self._model is not None

    def _token_counts(self, texts: list[str]) -> list[int]:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def _encode(self, texts: list[str]) -> Encoded:
        limit = self._model.max_seq_length
        tokens = [min(n, limit) for n in self._token_counts(texts)]
        vectors = self._model.encode(
            texts,
            batch_size=self._config.encode_batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return Encoded(vectors=np.asarray(vectors, dtype=np.float32), tokens=tokens)

    async def embed(self, texts: list[str], truncate: bool) -> Encoded:
        # Over-long inputs were already rejected by `count_tokens` when truncate is off;
        # the model itself always truncates at max_seq_length.
        if self._model is None:
            raise Unavailable(f"model {self._config.name!r} is still loading")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)

    async def count_tokens(self, texts: list[str]) -> list[int] | None:
        if self._model is None:
            raise Unavailable(f"model {self._config.name!r} is still loading")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._token_counts, texts)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
