"""What the HTTP backends (TEI, Ollama) share: the client, readiness and learning `info`."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import httpx
import numpy as np

from daert.embedding.backends.base import Encoded, ModelInfo
from daert.embedding.config import ModelConfig
from daert.runtime.errors import ServiceError, Unavailable
from daert.runtime.upstream import http_client, json_body, send

log = logging.getLogger("daert.embedding")

PROBE_TEXT = "dimension probe"


class RemoteBackend(ABC):
    kind: str
    label: str  # how errors name the upstream, e.g. "TEI"

    def __init__(self, config: ModelConfig) -> None:
        assert config.url is not None  # enforced by ModelConfig
        self._config = config
        self._url = config.url
        self._http = http_client(config.url, config.timeout_s)
        self._info: ModelInfo | None = None

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    async def start(self) -> None:  # noqa: B027 - deliberately empty for every remote backend
        """Nothing to load: the upstream may come up after us; `ready` keeps asking."""

    async def ready(self) -> bool:
        try:
            if not await self._healthy():
                return False
            if self._info is None:
                self._info = await self._learn_info()
                log.info(
                    "upstream model ready",
                    extra={
                        "model": self._config.name,
                        "url": self._url,
                        "dimensions": self._info.dimensions,
                    },
                )
            return True
        except ServiceError as exc:
            log.warning("%s not ready: %s", self.label, exc.message)
            return False

    async def request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One upstream call with failures mapped to gRPC statuses."""
        return await send(
            self._http,
            method,
            path,
            backend=self.label,
            url=self._url,
            invalid_field="inputs",
            json=json,
        )

    async def request_json(self, method: str, path: str, json: Any = None) -> Any:
        """One upstream call's JSON answer (a body that is not JSON is UNAVAILABLE)."""
        return json_body(await self.request(method, path, json), self.label)

    async def embed(self, texts: list[str], truncate: bool) -> Encoded:
        if self._info is None:
            raise Unavailable(f"{self.label} at {self._url} has not answered yet")
        vectors = await self._embed(texts, truncate)
        array = np.asarray(vectors, dtype=np.float32)
        if array.shape != (len(texts), self._info.dimensions):
            raise Unavailable(
                f"{self.label} returned vectors of shape {array.shape}, "
                f"expected ({len(texts)}, {self._info.dimensions})"
            )
        return Encoded(vectors=array, tokens=None)

    async def count_tokens(self, texts: list[str]) -> list[int] | None:
        return None  # the upstream enforces its own limit when truncation is off

    async def close(self) -> None:
        await self._http.aclose()

    async def _learn_info(self) -> ModelInfo:
        dimensions = len((await self._embed([PROBE_TEXT], truncate=True))[0])
        limit = self._config.max_input_tokens or await self._max_input_tokens()
        return ModelInfo(dimensions=dimensions, max_input_tokens=limit)

    @abstractmethod
    async def _healthy(self) -> bool: ...

    @abstractmethod
    async def _max_input_tokens(self) -> int: ...

    @abstractmethod
    async def _embed(self, texts: list[str], truncate: bool) -> list[list[float]]: ...
