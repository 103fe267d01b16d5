"""Ollama: `POST /api/embed`, `GET /api/tags`, `POST /api/show`."""

from __future__ import annotations

from daert.embedding.backends.remote import RemoteBackend


class OllamaBackend(RemoteBackend):
    kind = "ollama"
    label = "Ollama"

    @property
    def _model(self) -> str:
        return self._config.upstream_model or self._config.name

    async def _healthy(self) -> bool:
        """Reachable and the model pulled (Ollama names carry a tag, ":latest" by default)."""
        tags = await self.request_json("GET", "/api/tags")
        wanted = self._model if ":" in self._model else f"{self._model}:latest"
        return any(m.get("name") in (self._model, wanted) for m in tags.get("models", []))

    async def _max_input_tokens(self) -> int:
        show = await self.request_json("POST", "/api/show", json={"model": self._model})
        for key, value in (show.get("model_info") or {}).items():
            if key.endswith(".context_length"):
                return int(value)
        return 0

    async def _embed(self, texts: list[str], truncate: bool) -> list[list[float]]:
        body = {"model": self._model, "input": texts, "truncate": truncate}
        answer = await self.request_json("POST", "/api/embed", json=body)
        embeddings: list[list[float]] = answer["embeddings"]
        return embeddings
