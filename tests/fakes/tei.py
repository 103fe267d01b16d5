"""Fake Hugging Face text-embeddings-inference (TEI) HTTP server.

Wire format reproduced from huggingface/text-embeddings-inference:

* ``router/src/http/server.rs`` -- routes (``GET /health``, ``/``, ``/ping``; ``GET /info``;
  ``POST /embed``, and ``POST /`` / ``/invocations`` for embedding models), the ``embed``
  handler (batch checks: empty list -> ``Empty``; more than ``max_client_batch_size``
  inputs -> ``Validation`` "batch size {n} > maximum allowed batch size {max}"), the
  ``health`` handler (503 ``{"error": "unhealthy", "error_type": "Unhealthy"}``) and
  ``impl From<&ErrorType> for StatusCode``:
  Unhealthy 503, Backend 424, Overloaded 429, Tokenizer 422, Validation 413, Empty 400.
  Note: "input too long" is a *Validation* error and therefore 413, not 422.
* ``router/src/lib.rs`` -- ``ErrorResponse {error, error_type}``; ``ErrorType`` has no serde
  rename, so ``error_type`` is the variant name ("Validation", "Empty", ...); ``Info`` fields.
* ``router/src/http/types.rs`` -- ``EmbedRequest``: ``inputs`` (string or list),
  ``truncate`` (optional, defaults to the server's ``--auto-truncate``, itself false),
  ``truncation_direction`` (``Left``/``Right``, lower-case aliases, default ``Right``),
  ``prompt_name`` (optional), ``normalize`` (default true). Response: ``[[f32, ...], ...]``.
  ``RerankRequest``: ``query``, ``texts``, ``truncate`` (as above), ``truncation_direction``,
  ``raw_scores`` (default false), ``return_text`` (default false). Response: a list of
  ``Rank`` ``{"index", "text"?, "score"}`` (``text`` only with ``return_text``).
* ``router/src/http/server.rs`` ``rerank`` (the reranker mode, ``model_type="reranker"``):
  empty ``texts`` -> ``Empty`` "`texts` cannot be empty"; a model that is not a reranker ->
  ``Backend`` "model is not a re-ranker model"; more than ``max_client_batch_size`` texts ->
  ``Validation`` "batch size ..."; each (query, text) pair is tokenized as one input
  (``core/src/tokenization.rs``: the character limit applies to both together, and
  truncation is ``LongestFirst``), waits for a permit (never ``Overloaded``) and is scored;
  ranks are sorted ascending by score, then reversed (so equal scores come back in
  *descending* index order). A reranker's routes ``POST /`` and ``/invocations`` rerank,
  and its ``/embed`` answers ``Backend`` "Model is not an embedding model".
* ``core/src/infer.rs`` ``predict`` -- unless ``raw_scores``, a single-label score passes
  through a sigmoid.
* ``core/src/lib.rs`` -- ``TextEmbeddingsError`` display strings: "Input validation error: "
  prefix for Validation/Empty, "Model is overloaded" for Overloaded, "Backend error: " for
  Backend.
* ``core/src/tokenization.rs`` -- "`inputs` cannot be empty", "`inputs` must have less than
  {max_input_length} tokens. Given: {n}", "`inputs` must have less than {limit} characters.
  Given: {n}" (limit = max_input_length * 250), prompt-name errors.
* ``router/src/main.rs`` -- defaults: ``max_client_batch_size`` 32, ``max_concurrent_requests``
  512, ``max_batch_tokens`` 16384, ``payload_limit`` 2000000, ``auto_truncate`` false.
* Request-body rejections come from axum's ``Json`` extractor as ``text/plain``: 415
  "Expected request with `Content-Type: application/json`", 413 "Failed to buffer the request
  body: length limit exceeded", 400 "Failed to parse the request body as JSON: ...", 422
  "Failed to deserialize the JSON body into the target type: ..." (the serde detail after
  the colon is approximated here).

Simplifications: a "token" is a whitespace-separated word (no special tokens); token-id
inputs (``[1, 2, 3]``) and the newest ``dimensions`` field are not modelled (``dimensions``
is accepted and ignored). A reranker's logit for a pair is a pseudo-random number seeded by
the model id and the pair as scored (see :meth:`FakeTEI.score_for`); ``LongestFirst`` cuts
a word from the longer side until the pair fits.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from aiohttp import web

from .http_fake import FakeHTTPServer, f32_wire, stable_seed

#: TEI's ``ErrorType`` -> HTTP status (router/src/http/server.rs).
TEI_STATUS: dict[str, int] = {
    "Unhealthy": 503,
    "Backend": 424,
    "Overloaded": 429,
    "Tokenizer": 422,
    "Validation": 413,
    "Empty": 400,
}

_VALIDATION_PREFIX = "Input validation error: "  # TextEmbeddingsError::{Validation,Empty}
_CHAR_MULTIPLIER = 250  # core/src/tokenization.rs MAX_CHAR_MULTIPLIER
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


class _Reject(Exception):
    """Abort the handler with a ready response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def tei_error(error_type: str, message: str) -> web.Response:
    """A TEI ``ErrorResponse`` with the status TEI maps ``error_type`` to."""
    body = {"error": message, "error_type": error_type}
    return web.json_response(body, status=TEI_STATUS[error_type])


def _axum_text(status: int, text: str) -> _Reject:
    return _Reject(web.Response(status=status, text=text))


class FakeTEI(FakeHTTPServer):
    """In-process stand-in for a TEI embedding server (see module docstring)."""

    inference_paths: ClassVar[frozenset[str]] = frozenset(
        {"/embed", "/rerank", "/", "/invocations"}
    )

    def __init__(
        self,
        *,
        model_id: str = "fake/tei-model",
        dimensions: int = 8,
        max_input_length: int = 16,
        max_client_batch_size: int = 32,
        max_concurrent_requests: int = 512,
        auto_truncate: bool = False,
        payload_limit: int = 2_000_000,
        prompts: Mapping[str, str] | None = None,
        model_type: Literal["embedding", "reranker"] = "embedding",
        version: str = "1.8.0",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.model_id = model_id
        self.dimensions = dimensions
        self.max_input_length = max_input_length
        self.max_client_batch_size = max_client_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.auto_truncate = auto_truncate
        self.payload_limit = payload_limit
        self.prompts = dict(prompts) if prompts is not None else None
        self.model_type = model_type
        self.version = version
        #: When False, the health routes answer 503 Unhealthy.
        self.ready = True
        self._permits: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ public
    def vector_for(self, text: str, normalize: bool = True) -> list[float]:
        """The embedding the fake returns for ``text``, as a JSON client decodes it.

        ``text`` is what is actually embedded: prompt text prepended, and, for a
        truncated input, the kept words joined by single spaces.
        """
        rng = np.random.default_rng(stable_seed("tei", self.model_id, text))
        vec = rng.standard_normal(self.dimensions).astype(np.float32)
        if normalize:
            vec = (vec / max(float(np.linalg.norm(vec)), 1e-12)).astype(np.float32)
        return f32_wire(vec)

    def score_for(self, query: str, text: str, raw_scores: bool = False) -> float:
        """The score the reranker returns for a pair, as a JSON client decodes it.

        ``query`` and ``text`` are what is actually scored: for a truncated pair, the kept
        words joined by single spaces.
        """
        rng = np.random.default_rng(stable_seed("tei-rerank", self.model_id, query, text))
        logit = float(rng.standard_normal()) * 3
        score = logit if raw_scores else 1 / (1 + math.exp(-logit))
        return f32_wire([score])[0]

    def fail_next_tei(self, error_type: str, message: str, times: int = 1) -> None:
        """Queue TEI-shaped errors, e.g. ``fail_next_tei("Overloaded", "Model is overloaded")``."""
        self.fail_next(TEI_STATUS[error_type], {"error": message, "error_type": error_type}, times)

    def info(self) -> dict[str, Any]:
        """The ``GET /info`` body (router/src/lib.rs ``Info``)."""
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": self.model_id,
            "model_type": (
                {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
                if self.model_type == "reranker"
                else {"embedding": {"pooling": "mean"}}
            ),
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_input_length": self.max_input_length,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": self.max_client_batch_size,
            "auto_truncate": self.auto_truncate,
            "tokenization_workers": 4,
            "version": self.version,
            "sha": None,
            "docker_label": None,
        }

    # ---------------------------------------------------------------- routing
    def _add_routes(self, app: web.Application) -> None:
        self._permits = asyncio.Semaphore(self.max_concurrent_requests)
        for path in ("/health", "/", "/ping"):
            app.router.add_get(path, self._health)
        app.router.add_get("/info", self._info)
        app.router.add_post("/embed", self._embed)
        app.router.add_post("/rerank", self._rerank)
        default = self._rerank if self.model_type == "reranker" else self._embed
        for path in ("/", "/invocations"):
            app.router.add_post(path, default)

    async def _health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return tei_error("Unhealthy", "unhealthy")
        return web.Response(status=200)  # Ok(()) -> empty 200

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info())

    async def _embed(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        try:
            req = await self._parse(request)
            return await self._embed_checked(req, start)
        except _Reject as rej:
            return rej.response

    async def _read_json(self, request: web.Request, struct: str) -> dict[str, Any]:
        """axum ``Json<struct>`` extraction up to the struct's own fields, in axum's order."""
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not (ctype == "application/json" or ctype.endswith("+json")):
            raise _axum_text(415, "Expected request with `Content-Type: application/json`")
        raw = await request.read()
        if len(raw) > self.payload_limit:
            raise _axum_text(413, "Failed to buffer the request body: length limit exceeded")
        try:
            req = json.loads(raw)
        except ValueError as exc:
            raise _axum_text(400, f"Failed to parse the request body as JSON: {exc}") from None
        if not isinstance(req, dict):
            raise _axum_text(422, _DESERIALIZE + f"invalid type, expected struct {struct}")
        return req

    @staticmethod
    def _check_truncation_fields(req: dict[str, Any]) -> None:
        if req.get("truncate") is not None and not isinstance(req["truncate"], bool):
            raise _axum_text(422, _DESERIALIZE + "truncate: invalid type, expected a boolean")
        direction = req.get("truncation_direction", "Right")
        if direction not in ("Left", "left", "Right", "right"):
            raise _axum_text(
                422, _DESERIALIZE + f"truncation_direction: unknown variant `{direction}`"
            )

    async def _parse(self, request: web.Request) -> dict[str, Any]:
        """axum ``Json<EmbedRequest>`` extraction, in axum's order."""
        req = await self._read_json(request, "EmbedRequest")
        inputs = req.get("inputs")
        if "inputs" not in req:
            raise _axum_text(422, _DESERIALIZE + "missing field `inputs`")
        if not (
            isinstance(inputs, str)
            or (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs))
        ):
            raise _axum_text(422, _DESERIALIZE + "data did not match any variant of untagged enum")
        if not isinstance(req.get("normalize", True), bool):
            raise _axum_text(422, _DESERIALIZE + "normalize: invalid type, expected a boolean")
        self._check_truncation_fields(req)
        if req.get("prompt_name") is not None and not isinstance(req["prompt_name"], str):
            raise _axum_text(422, _DESERIALIZE + "prompt_name: invalid type, expected a string")
        return req

    async def _embed_checked(self, req: dict[str, Any], start: float) -> web.Response:
        assert self._permits is not None
        inputs: str | list[str] = req["inputs"]
        truncate = self.auto_truncate if req.get("truncate") is None else bool(req["truncate"])
        left = str(req.get("truncation_direction", "Right")).lower() == "left"
        prompt_name: str | None = req.get("prompt_name")
        normalize: bool = req.get("normalize", True)

        if isinstance(inputs, str):
            # Single input: Infer::try_acquire_permit() -> Overloaded when saturated.
            if self._permits.locked():
                raise _Reject(tei_error("Overloaded", "Model is overloaded"))
            texts, permits = [inputs], 1
        else:
            if not inputs:
                raise _Reject(tei_error("Empty", "`inputs` cannot be empty"))
            if len(inputs) > self.max_client_batch_size:
                msg = (
                    f"batch size {len(inputs)} > maximum allowed batch size "
                    f"{self.max_client_batch_size}"
                )
                raise _Reject(tei_error("Validation", msg))
            # Batch inputs wait for permits (acquire_permit), they are never rejected.
            texts, permits = inputs, min(len(inputs), self.max_concurrent_requests)
        if self.model_type == "reranker":  # core/src/infer.rs embed(): is_classifier()
            raise _Reject(tei_error("Backend", "Backend error: Model is not an embedding model"))

        encoded = [self._encode(t, truncate, left, prompt_name) for t in texts]
        for _ in range(permits):
            await self._permits.acquire()
        try:
            await self._simulate_latency()  # "inference"
        finally:
            for _ in range(permits):
                self._permits.release()

        vectors = [self.vector_for(text, normalize) for text, _ in encoded]
        elapsed_ms = str(int((time.monotonic() - start) * 1000))
        headers = {  # router/src/lib.rs: From<ResponseMetadata> for HeaderMap
            "x-compute-type": "gpu+optimized",
            "x-compute-time": elapsed_ms,
            "x-compute-characters": str(sum(len(t) for t in texts)),
            "x-compute-tokens": str(sum(n for _, n in encoded)),
            "x-total-time": elapsed_ms,
            "x-tokenization-time": "0",
            "x-queue-time": "0",
            "x-inference-time": elapsed_ms,
        }
        return web.json_response(vectors, headers=headers)

    def _encode(
        self, text: str, truncate: bool, left: bool, prompt_name: str | None
    ) -> tuple[str, int]:
        """Tokenization/validation of one input -> (text to embed, token count)."""
        if text == "":
            raise _Reject(tei_error("Empty", _VALIDATION_PREFIX + "`inputs` cannot be empty"))
        prefix = self._prompt(prompt_name)
        limit = self.max_input_length * _CHAR_MULTIPLIER
        if len(text) > limit:
            if not truncate:
                msg = f"`inputs` must have less than {limit} characters. Given: {len(text)}"
                raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
            text = text[:limit]
        full = prefix + text
        words = full.split()
        if len(words) > self.max_input_length:
            if not truncate:
                msg = (
                    f"`inputs` must have less than {self.max_input_length} tokens. "
                    f"Given: {len(words)}"
                )
                raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
            kept = words[-self.max_input_length :] if left else words[: self.max_input_length]
            return " ".join(kept), len(kept)
        return full, len(words)

    def _prompt(self, prompt_name: str | None) -> str:
        """core/src/tokenization.rs ``prepare_pre_prompt``."""
        if prompt_name is None:
            return ""
        if self.prompts is None:
            msg = (
                f"`default-prompt-name` is set to `{prompt_name}` but no prompts were found "
                "in the Sentence Transformers configuration"
            )
            raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
        if prompt_name not in self.prompts:
            keys = "[" + ", ".join(f'"{k}"' for k in self.prompts) + "]"  # Rust {:?}
            msg = (
                f"`default-prompt-name` is set to `{prompt_name}` but it was not found in the "
                f"Sentence Transformers prompts. Available prompts: {keys}"
            )
            raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
        return self.prompts[prompt_name]

    # ------------------------------------------------------------------ rerank
    async def _rerank(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        try:
            req = await self._parse_rerank(request)
            return await self._rerank_checked(req, start)
        except _Reject as rej:
            return rej.response

    async def _parse_rerank(self, request: web.Request) -> dict[str, Any]:
        """axum ``Json<RerankRequest>`` extraction, in axum's order."""
        req = await self._read_json(request, "RerankRequest")
        for name in ("query", "texts"):
            if name not in req:
                raise _axum_text(422, _DESERIALIZE + f"missing field `{name}`")
        if not isinstance(req["query"], str):
            raise _axum_text(422, _DESERIALIZE + "query: invalid type, expected a string")
        texts = req["texts"]
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise _axum_text(422, _DESERIALIZE + "texts: invalid type, expected a sequence")
        for flag in ("raw_scores", "return_text"):
            if not isinstance(req.get(flag, False), bool):
                raise _axum_text(422, _DESERIALIZE + f"{flag}: invalid type, expected a boolean")
        self._check_truncation_fields(req)
        return req

    async def _rerank_checked(self, req: dict[str, Any], start: float) -> web.Response:
        assert self._permits is not None
        query: str = req["query"]
        texts: list[str] = req["texts"]
        truncate = self.auto_truncate if req.get("truncate") is None else bool(req["truncate"])
        left = str(req.get("truncation_direction", "Right")).lower() == "left"
        raw_scores: bool = req.get("raw_scores", False)

        if not texts:
            raise _Reject(tei_error("Empty", "`texts` cannot be empty"))
        if self.model_type != "reranker":
            raise _Reject(tei_error("Backend", "Backend error: model is not a re-ranker model"))
        if len(texts) > self.max_client_batch_size:
            msg = (
                f"batch size {len(texts)} > maximum allowed batch size {self.max_client_batch_size}"
            )
            raise _Reject(tei_error("Validation", msg))

        encoded = [self._encode_pair(query, t, truncate, left) for t in texts]
        # Every pair waits for its permit (acquire_permit): never Overloaded.
        permits = min(len(texts), self.max_concurrent_requests)
        for _ in range(permits):
            await self._permits.acquire()
        try:
            await self._simulate_latency()  # "inference"
        finally:
            for _ in range(permits):
                self._permits.release()

        ranks = []
        for index, (text, (q, t, _)) in enumerate(zip(texts, encoded, strict=True)):
            rank: dict[str, Any] = {"index": index}
            if req.get("return_text", False):
                rank["text"] = text
            rank["score"] = self.score_for(q, t, raw_scores)
            ranks.append(rank)
        # Rust: ranks.sort_by(partial_cmp) (stable, ascending), then ranks.reverse().
        ranks.sort(key=lambda r: r["score"])
        ranks.reverse()

        elapsed_ms = str(int((time.monotonic() - start) * 1000))
        headers = {
            "x-compute-type": "gpu+optimized",
            "x-compute-time": elapsed_ms,
            "x-compute-characters": str(len(query) * len(texts) + sum(len(t) for t in texts)),
            "x-compute-tokens": str(sum(n for _, _, n in encoded)),
            "x-total-time": elapsed_ms,
            "x-tokenization-time": "0",
            "x-queue-time": "0",
            "x-inference-time": elapsed_ms,
        }
        return web.json_response(ranks, headers=headers)

    def _encode_pair(
        self, query: str, text: str, truncate: bool, left: bool
    ) -> tuple[str, str, int]:
        """Tokenization/validation of one (query, text) pair -> (query, text) as scored and
        the token count."""
        if query == "" and text == "":
            raise _Reject(tei_error("Empty", _VALIDATION_PREFIX + "`inputs` cannot be empty"))
        limit = self.max_input_length * _CHAR_MULTIPLIER
        chars = len(query) + len(text)
        if chars > limit:
            if not truncate:
                msg = f"`inputs` must have less than {limit} characters. Given: {chars}"
                raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
            query, text = query[: limit // 2], text[: limit // 2]
        first, second = query.split(), text.split()
        total = len(first) + len(second)
        if total > self.max_input_length:
            if not truncate:
                msg = f"`inputs` must have less than {self.max_input_length} tokens. Given: {total}"
                raise _Reject(tei_error("Validation", _VALIDATION_PREFIX + msg))
            while len(first) + len(second) > self.max_input_length:  # LongestFirst
                longer = first if len(first) > len(second) else second
                longer.pop(0 if left else -1)
            return " ".join(first), " ".join(second), self.max_input_length
        return query, text, total
