"""Hugging Face text-embeddings-inference: `POST /embed`, `GET /health`, `GET /info`."""

from __future__ import annotations

from daert.embedding.backends.remote import RemoteBackend


class TeiBackend(RemoteBackend):
    kind = "tei"
    label = "TEI"

    _max_client_batch_size = 32  # TEI's default, replaced by /info's value

    async def _healthy(self) -> bool:
        await self.request("GET", "/health")  # 503 while TEI is still loading
        return True

    async def _max_input_tokens(self) -> int:
        info = await self.request_json("GET", "/info")
        self._max_client_batch_size = int(info.get("max_client_batch_size") or 32)
        return int(info.get("max_input_length") or 0)

    async def _embed(self, texts: list[str], truncate: bool) -> list[list[float]]:
        vectors: list[list[float]] = []
        # A batch larger than TEI accepts would be a 413; send it in TEI-sized pieces.
        step = self._max_client_batch_size
        for start in range(0, len(texts), step):
            body = {"inputs": texts[start : start + step], "normalize": False, "truncate": truncate}
            vectors.extend(await self.request_json("POST", "/embed", json=body))
        return vectors
