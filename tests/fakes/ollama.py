"""Fake Ollama HTTP server (embedding subset).

Wire format reproduced from ollama/ollama:

* ``server/routes.go`` ``EmbedHandler``: empty body -> 400 ``{"error": "missing request
  body"}``; other bind errors -> 400 ``{"error": <decode error>}``; ``input`` that is
  neither a string nor a list of strings -> 400 ``{"error": "invalid input type"}``;
  ``""`` / ``[]`` -> 200 ``{"model": ..., "embeddings": []}``; each embedding is
  L2-normalised, and with ``0 < dimensions < len`` cut to ``dimensions`` and normalised
  again; errors from the runner are returned with the runner's status as
  ``{"error": <message>}``.
* ``server/routes.go`` ``handleScheduleError``: a model that is not present locally ->
  404 ``{"error": "model \\"<name>\\" not found, try pulling it first"}`` (Go ``%q``).
* ``runner/*/runner.go``: ``errorInputTooLong = "the input length exceeds the context
  length"``, sent with 400 when the input is longer than the context and truncation is
  off; ``llm/server.go`` wraps it in ``api.StatusError{StatusCode: 400}``, which the
  handler returns as 400 ``{"error": "the input length exceeds the context length"}``.
  With ``truncate`` unset or true the input is cut to the context length and embedded.
* ``api/types.go``: ``EmbedRequest`` (``model``, ``input``, ``keep_alive``, ``truncate``
  (``*bool``, nil = true), ``dimensions``, ``options``); ``EmbedResponse`` (``model``,
  ``embeddings``, and ``total_duration`` / ``load_duration`` (ns) / ``prompt_eval_count``,
  all ``omitempty``); ``ListModelResponse`` / ``ModelDetails`` for ``GET /api/tags``.
* ``docs/api.md``: ``truncate`` "Defaults to `true`"; durations are nanoseconds; examples.
* ``GET /api/version`` -> ``{"version": ...}``; ``GET /`` -> ``Ollama is running``.

Simplifications: a "token" is a whitespace-separated word; the context length is
``min(num_ctx, options.num_ctx)``; Go's JSON decode error texts are approximated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from aiohttp import web

from .http_fake import FakeHTTPServer, f32_wire, stable_seed

INPUT_TOO_LONG = "the input length exceeds the context length"
_MODIFIED_AT = "2025-01-15T10:20:30.123456789Z"  # time.Time, RFC 3339 with nanoseconds


def canonical_model_name(name: str) -> str:
    """``all-minilm`` -> ``all-minilm:latest`` (the tag defaults to ``latest``)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def model_not_found(name: str) -> str:
    """The 404 message; ``json.dumps`` quotes like Go's ``%q`` for plain names."""
    return f"model {json.dumps(name, ensure_ascii=False)} not found, try pulling it first"


class FakeOllama(FakeHTTPServer):
    """In-process stand-in for an Ollama server's embedding API (see module docstring)."""

    inference_paths: ClassVar[frozenset[str]] = frozenset({"/api/embed"})

    def __init__(
        self,
        *,
        models: Mapping[str, int] | None = None,
        num_ctx: int = 16,
        version: str = "0.12.6",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        #: canonical model name -> embedding dimensions
        self.models: dict[str, int] = {
            canonical_model_name(k): v for k, v in (models or {"all-minilm:latest": 8}).items()
        }
        self.num_ctx = num_ctx
        self.version = version

    # ------------------------------------------------------------------ public
    def vector_for(
        self, text: str, model: str | None = None, dimensions: int | None = None
    ) -> list[float]:
        """The (always L2-normalised) embedding returned for ``text``.

        ``model`` defaults to the first configured model. ``text`` is what is embedded:
        for a truncated input, the kept words joined by single spaces.
        """
        name = canonical_model_name(model) if model else next(iter(self.models))
        resolved = self._resolve(name)
        if resolved is None:
            raise KeyError(name)
        rng = np.random.default_rng(stable_seed("ollama", resolved, text))
        vec = _normalize(rng.standard_normal(self.models[resolved]).astype(np.float32))
        if dimensions is not None and 0 < dimensions < len(vec):
            vec = _normalize(vec[:dimensions])
        return f32_wire(vec)

    def fail_next_ollama(self, status: int, message: str, times: int = 1) -> None:
        """Queue Ollama-shaped errors: ``status`` with ``{"error": message}``."""
        self.fail_next(status, {"error": message}, times)

    def tags(self) -> dict[str, Any]:
        """The ``GET /api/tags`` body (api/types.go ``ListResponse``)."""
        return {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "modified_at": _MODIFIED_AT,
                    "size": 45_960_996,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "bert",
                        "families": ["bert"],
                        "parameter_size": "23M",
                        "quantization_level": "F16",
                    },
                }
                for name in self.models
            ]
        }

    # ---------------------------------------------------------------- routing
    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._root)  # also answers HEAD
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_post("/api/show", self._show)

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(self.tags())

    async def _show(self, request: web.Request) -> web.Response:
        """``POST /api/show`` (server/routes.go ShowHandler): model_info carries the
        architecture's GGUF keys, ``<arch>.context_length`` among them."""
        body = await request.json()
        name = str(body.get("model") or body.get("name") or "")
        resolved = self._resolve(name)
        if resolved is None:
            return _error(404, f"model '{name}' not found")
        return web.json_response(
            {
                "modelfile": f"FROM {resolved}\n",
                "parameters": "",
                "template": "",
                "details": self.tags()["models"][0]["details"],
                "model_info": {
                    "general.architecture": "bert",
                    "bert.context_length": self.num_ctx,
                    "bert.embedding_length": self.models[resolved],
                },
                "capabilities": ["embedding"],
                "modified_at": _MODIFIED_AT,
            }
        )

    def _resolve(self, name: str) -> str | None:
        """Local model lookup; getExistingName matches case-insensitively."""
        canonical = canonical_model_name(name).lower()
        return next((m for m in self.models if m.lower() == canonical), None)

    async def _embed(self, request: web.Request) -> web.Response:
        start = time.monotonic_ns()
        raw = await request.read()
        if not raw.strip():
            return _error(400, "missing request body")
        try:
            req = json.loads(raw)
        except ValueError as exc:
            return _error(400, str(exc))
        if not isinstance(req, dict):
            return _error(400, "json: cannot unmarshal into Go value of type api.EmbedRequest")
        for field, types, go_type in (
            ("model", (str,), "string"),
            ("truncate", (bool,), "bool"),
            ("dimensions", (int,), "int"),
            ("options", (dict,), "map[string]interface {}"),
        ):
            value = req.get(field)
            if value is not None and (
                not isinstance(value, types) or (go_type == "int" and isinstance(value, bool))
            ):
                return _error(
                    400,
                    f"json: cannot unmarshal {type(value).__name__} into Go struct field "
                    f"EmbedRequest.{field} of type {go_type}",
                )
        model: str = req.get("model") or ""
        raw_input = req.get("input")
        if isinstance(raw_input, str):
            texts = [raw_input] if raw_input else []
        elif isinstance(raw_input, list):
            if not all(isinstance(t, str) for t in raw_input):
                return _error(400, "invalid input type")
            texts = list(raw_input)
        elif raw_input is None:
            texts = []
        else:
            return _error(400, "invalid input type")

        resolved = self._resolve(model)
        if resolved is None:
            return _error(404, model_not_found(model))
        num_ctx = self.num_ctx
        opt_ctx = (req.get("options") or {}).get("num_ctx")
        if isinstance(opt_ctx, int | float) and not isinstance(opt_ctx, bool) and opt_ctx > 0:
            num_ctx = min(num_ctx, int(opt_ctx))
        loaded = time.monotonic_ns()

        if not texts:  # durations unset -> omitted (omitempty)
            return web.json_response({"model": model, "embeddings": []})

        await self._simulate_latency()  # "inference"
        truncate = req.get("truncate") is not False  # *bool: nil means true
        dims = req.get("dimensions") or 0
        embeddings: list[list[float]] = []
        tokens = 0
        for text in texts:
            words = text.split()
            if len(words) > num_ctx:
                if not truncate:
                    return _error(400, INPUT_TOO_LONG)
                words = words[:num_ctx]
                text = " ".join(words)
            tokens += len(words)
            embeddings.append(self.vector_for(text, resolved, dims or None))

        body: dict[str, Any] = {"model": model, "embeddings": embeddings}
        body["total_duration"] = max(time.monotonic_ns() - start, 1)
        body["load_duration"] = max(loaded - start, 1)
        if tokens:
            body["prompt_eval_count"] = tokens
        return web.json_response(body)


def _normalize(vec: Any) -> Any:
    """server/routes.go ``normalize``: v / max(||v||, 1e-12) in float32."""
    norm = max(float(np.sqrt(np.sum(vec.astype(np.float64) ** 2))), 1e-12)
    return (vec / norm).astype(np.float32)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
