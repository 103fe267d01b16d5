"""Fake Hugging Face Text Generation Inference (TGI) server, native API (TGI 2.x).

Wire format reproduced from huggingface/text-generation-inference:

* ``router/src/server.rs``: routes ``POST /generate``, ``/generate_stream``, ``/``
  (``compat_generate``: ``stream`` false -> a *list* ``[GenerateResponse]``, true -> the SSE
  stream; ``return_full_text`` defaults to true there, ``router/src/main.rs`` setting it
  for ``text-generation`` models), ``GET /health`` / ``/`` / ``/ping`` (200 empty; 503
  ``{"error": "unhealthy", "error_type": "healthcheck"}``), ``GET /info``, ``GET /v1/models``.
  ``generate``: headers ``x-compute-type`` (``COMPUTE_TYPE``, default ``gpu+optimized``),
  ``x-compute-time`` (seconds, f64), ``x-compute-characters``, ``x-total-time``,
  ``x-validation-time``, ``x-queue-time``, ``x-inference-time``, ``x-time-per-token`` (ms),
  ``x-prompt-tokens``, ``x-generated-tokens``; ``details`` only when ``details`` or
  ``decoder_input_details``; ``return_full_text`` prepends the inputs.
  ``generate_stream``: headers ``x-compute-type``, ``x-compute-characters``,
  ``X-Accel-Buffering: no``; *always status 200*: every error (validation, overload,
  generation) arrives as an SSE event (``generate_stream_internal`` yields the ``Err`` of
  ``infer.generate_stream``, whose ``limit_concurrent_requests`` sheds with Overloaded);
  ``best_of != 1`` and ``decoder_input_details`` are refused there (``BestOfStream``,
  ``PrefillDetailsStream``); one ``StreamResponse`` per generated token (``index`` from 1,
  ``token``, ``generated_text: null``, ``details: null``), the last one with
  ``generated_text`` and, if ``details``, ``details``.
  ``impl From<InferError> for Event``: the error event is ``Event::default().json_data(
  ErrorResponse {error, error_type})`` -- a plain ``data:`` line, no ``event:`` line.
  ``impl From<InferError> for (StatusCode, Json<ErrorResponse>)``: GenerationError 424,
  Overloaded 429, ValidationError 422, IncompleteGeneration 500.
* axum ``response/sse.rs``: ``json_data`` writes ``data:`` + compact JSON + ``\\n`` (no space
  after the colon), the event ends with a blank line; ``Content-Type: text/event-stream``,
  ``Cache-Control: no-cache``. Proxies and other servers often write ``data: {...}``; choose
  with ``sse_space``.
* ``router/src/infer/mod.rs``: ``InferError`` texts and ``error_type``: "Request failed
  during generation: {0}" ``generation``, "Model is overloaded" ``overloaded``, "Input
  validation error: {0}" ``validation``, "Incomplete generation" ``incomplete_generation``;
  the concurrency permit (``max_concurrent_requests``) is taken with ``try_acquire`` before
  validation (-> Overloaded).
* ``router/src/validation.rs`` ``validate`` (order kept): ``best_of > 1`` without sampling,
  "`temperature` must be strictly positive" (``temperature <= 0``), "`repetition_penalty`
  must be strictly positive", "`frequency_penalty` must be >= -2.0 and <= 2.0", "`top_p` must
  be > 0.0 and < 1.0" (1.0 is refused), "`typical_p` must be > 0.0 and < 1.0", "`top_k` must
  be strictly positive", "`max_new_tokens` must be strictly positive" (0), "`stop` supports
  up to {max} stop sequences. Given: {n}", "`inputs` cannot be empty", "`truncate` must be
  strictly positive and less than {max_input}. Given: {n}", then ``validate_input``: "`inputs`
  tokens + `max_new_tokens` must be <= {max_total}. Given: {n} `inputs` tokens and {m}
  `max_new_tokens`" *before* "`inputs` must have less than {max_input} tokens. Given: {n}";
  grammar ``{"type": "json"|"regex", "value": ...}`` (a JSON string value must parse:
  "grammar is not valid: ..."). ``validate_best_of`` (before the permit and ``validate``):
  "`best_of` != 1 is not allowed for this endpoint" (``max_best_of`` 1), "`best_of` must be
  > 0 and <= {max}. Given: {n}"; ``best_of_sequences`` then lists the other sequences.
* ``router/src/lib.rs`` / ``docs/openapi.json`` (2.4): ``GenerateParameters`` (``best_of``,
  ``temperature``, ``repetition_penalty``, ``frequency_penalty``, ``top_k``, ``top_p``,
  ``typical_p``, ``do_sample``, ``max_new_tokens`` (default 100; null -> ``max_total_tokens -
  input length``), ``return_full_text``, ``stop``, ``truncate``, ``watermark``, ``details``
  (default false), ``decoder_input_details``, ``seed``, ``top_n_tokens``, ``grammar``,
  ``adapter_id``); ``Details {finish_reason, generated_tokens, seed, prefill, tokens,
  best_of_sequences?, top_tokens?}``; ``StreamDetails {finish_reason, generated_tokens,
  seed, input_length}``; ``StreamResponse {index, token, top_tokens?, generated_text,
  details}``; ``Token {id, text, logprob, special}``; ``FinishReason`` ``length`` /
  ``eos_token`` / ``stop_sequence``; ``Info`` (``model_id, model_sha, model_pipeline_tag,
  max_concurrent_requests, max_best_of, max_stop_sequences, max_input_tokens,
  max_total_tokens, validation_workers, max_client_batch_size, router, version, sha,
  docker_label``).
* ``server/text_generation_server/utils/tokens.py`` ``StoppingCriteria``: on every token,
  ``max_new_tokens`` first, then EOS, then ``StopSequenceCriteria`` (regex ``{stop}$`` on the
  output so far). The generated text is the decoded tokens, so the stop sequence *stays in*
  ``generated_text``; the EOS token (``special: true``) is counted in ``generated_tokens``
  and is the last stream event, but is not part of the text. ``seed`` is reported only when
  the request samples (``do_sample``, or temperature != 1, top_k, top_p < 1, typical_p < 1).
* LoRA (``adapter_id``): TGI serves the base model for an ``adapter_id`` it did not load,
  without an error (huggingface/text-generation-inference#2505); so does this fake. With
  ``strict_adapters=True`` an unknown adapter instead fails with a 424 ``generation`` error
  whose text ("adapter `x` is not loaded") is the fake's own, not TGI's.
* Request-body rejections come from axum's ``Json`` extractor as ``text/plain``: 415, 400
  "Failed to parse the request body as JSON: ...", 422 "Failed to deserialize the JSON body
  into the target type: ..." (the serde detail is approximated).

Simplifications: a token is a whitespace-separated word (``input_length``); ``truncate``
keeps the last words (TGI truncates on the left); ``top_n_tokens`` gives the fake's
:func:`.llm.alternatives` (``details.top_tokens``, one list per token, and each stream event's
``top_tokens``; both left out when empty, as TGI's serde does);
a request without ``seed`` that samples reports a seed derived from the inputs (TGI: random).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from aiohttp import web

from .http_fake import stable_seed
from .llm import (
    FakeLLMServer,
    Generation,
    Token,
    _Abort,
    alternatives,
    compact_json,
    token_id,
    token_logprob,
)

#: TGI's ``InferError`` kinds -> (HTTP status, ``error_type``).
TGI_ERRORS: dict[str, tuple[int, str]] = {
    "generation": (424, "generation"),
    "overloaded": (429, "overloaded"),
    "validation": (422, "validation"),
    "incomplete_generation": (500, "incomplete_generation"),
}
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


class _InferError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status(self) -> int:
        return TGI_ERRORS[self.kind][0]

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": TGI_ERRORS[self.kind][1]}


def tgi_error_text(kind: str, detail: str) -> str:
    """TGI's text for an ``InferError`` of ``kind`` (router/src/infer/mod.rs)."""
    texts = {
        "generation": f"Request failed during generation: {detail}",
        "validation": f"Input validation error: {detail}",
        "overloaded": "Model is overloaded",
        "incomplete_generation": "Incomplete generation",
    }
    return texts[kind]


def _validation(message: str) -> _InferError:
    return _InferError("validation", f"Input validation error: {message}")


class FakeTGI(FakeLLMServer):
    """In-process stand-in for a TGI server's native API (see module docstring)."""

    inference_paths: ClassVar[frozenset[str]] = frozenset({"/generate", "/generate_stream", "/"})

    def __init__(
        self,
        *,
        model_id: str = "fake/tgi-model",
        max_input_tokens: int = 1024,
        max_total_tokens: int = 2048,
        max_concurrent_requests: int = 128,
        max_best_of: int = 2,
        max_stop_sequences: int = 4,
        max_client_batch_size: int = 4,
        sse_space: bool = False,
        adapters: Iterable[str] | None = None,
        strict_adapters: bool = False,
        compute_type: str = "gpu+optimized",
        version: str = "2.4.1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.model_id = model_id
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.max_best_of = max_best_of
        self.max_stop_sequences = max_stop_sequences
        self.max_client_batch_size = max_client_batch_size
        self.sse_space = sse_space
        #: Loaded LoRA adapter ids (None: any ``adapter_id`` is accepted).
        self.adapters: set[str] | None = set(adapters) if adapters is not None else None
        self.strict_adapters = strict_adapters
        self.compute_type = compute_type
        self.version = version
        #: When False, the health routes answer 503.
        self.ready = True
        self._adapter_ids: list[str | None] = []
        self._adapter_lock = threading.Lock()
        self._permits: asyncio.Semaphore | None = None
        self._infer_failures: deque[tuple[int, str, str]] = deque()

    # ------------------------------------------------------------------ public
    @property
    def adapter_ids(self) -> list[str | None]:
        """The ``adapter_id`` of every generation request that passed validation."""
        with self._adapter_lock:
            return list(self._adapter_ids)

    def generation(
        self,
        inputs: str,
        *,
        max_new_tokens: int | None = 100,
        stop: Iterable[str] = (),
        json_mode: bool = False,
    ) -> Generation:
        """What a request with these inputs generates (TGI's stopping rules).
        ``max_new_tokens=None`` stands for an explicit null (``max_total - input length``)."""
        limit = max_new_tokens
        if limit is None:
            limit = self.max_total_tokens - len(inputs.split())
        return self.generate(
            inputs,
            max_tokens=limit,
            stop=list(stop),
            json_mode=json_mode,
            length_first=True,
            stop_mode="suffix",
        )

    def expected_text(self, inputs: str, **kwargs: Any) -> str:
        """The ``generated_text`` for these inputs (see :meth:`generation`)."""
        return self.generation(inputs, **kwargs).text

    def fail_next_tgi(self, status: int, message: str, error_type: str, times: int = 1) -> None:
        """Queue TGI's own errors for the next generation requests, e.g. ``fail_next_tgi(429,
        "Model is overloaded", "overloaded")``: ``/generate`` answers them with ``status``,
        ``/generate_stream`` with 200 and the error event, as TGI does. (``fail_next``
        answers HTTP errors on every route, as a proxy in front of TGI would.)"""
        with self._lock:
            self._infer_failures.extend([(status, message, error_type)] * times)

    def reset(self) -> None:
        """Base reset plus the queued TGI errors."""
        super().reset()
        with self._lock:
            self._infer_failures.clear()

    def info(self) -> dict[str, Any]:
        """The ``GET /info`` body."""
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": self.max_best_of,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": self.max_client_batch_size,
            "router": "text-generation-router",
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
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/", self._compat)
        app.router.add_route("*", "/{tail:.*}", self._not_found)

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def _health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return self._json({"error": "unhealthy", "error_type": "healthcheck"}, 503)
        return web.Response(status=200)

    async def _info(self, request: web.Request) -> web.Response:
        return self._json(self.info())

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}
        return self._json({"object": "list", "data": [card]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse(request, "GenerateRequest")
            return await self._unary(request, req, compat=False)
        except _Abort as abort:
            return abort.response

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse(request, "GenerateRequest")
        except _Abort as abort:
            return abort.response
        return await self._stream(request, req)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse(request, "CompatGenerateRequest")
            if req.get("stream") is True:
                return await self._stream(request, req)
            params = req["parameters"]
            if params.get("return_full_text") is None:
                # main.rs: the compat route defaults return_full_text to "the model's
                # pipeline_tag is text-generation", which /info reports.
                params["return_full_text"] = True
            return await self._unary(request, req, compat=True)
        except _Abort as abort:
            return abort.response

    # --------------------------------------------------------------- parsing
    async def _parse(self, request: web.Request, struct: str) -> dict[str, Any]:
        """axum ``Json<GenerateRequest>`` extraction (text/plain rejections)."""
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not (ctype == "application/json" or ctype.endswith("+json")):
            raise _Abort(_text(415, "Expected request with `Content-Type: application/json`"))
        raw = await request.read()
        try:
            req = json.loads(raw)
        except ValueError as exc:
            raise _Abort(_text(400, f"Failed to parse the request body as JSON: {exc}")) from None
        if not isinstance(req, dict):
            raise _Abort(_text(422, _DESERIALIZE + f"invalid type, expected struct {struct}"))
        if "inputs" not in req:
            raise _Abort(_text(422, _DESERIALIZE + "missing field `inputs`"))
        if not isinstance(req["inputs"], str):
            raise _Abort(_text(422, _DESERIALIZE + "inputs: invalid type, expected a string"))
        params = req.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise _Abort(
                _text(
                    422,
                    _DESERIALIZE + "parameters: invalid type, expected struct GenerateParameters",
                )
            )
        for name, kind in (
            ("temperature", "float"),
            ("repetition_penalty", "float"),
            ("frequency_penalty", "float"),
            ("top_p", "float"),
            ("typical_p", "float"),
            ("top_k", "int"),
            ("max_new_tokens", "uint"),
            ("best_of", "uint"),
            ("truncate", "uint"),
            ("seed", "uint"),
            ("top_n_tokens", "uint"),
        ):
            value = params.get(name)
            if value is None:
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if kind != "float":
                ok = ok and isinstance(value, int)
            if kind == "uint":
                ok = ok and value >= 0
            if not ok:
                raise _Abort(
                    _text(422, _DESERIALIZE + f"parameters.{name}: invalid value: {value!r}")
                )
        stop = params.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _Abort(
                _text(422, _DESERIALIZE + "parameters.stop: invalid type, expected a sequence")
            )
        grammar = params.get("grammar")
        if grammar is not None and (
            not isinstance(grammar, dict) or grammar.get("type") not in ("json", "regex")
        ):
            raise _Abort(
                _text(
                    422,
                    _DESERIALIZE
                    + "parameters.grammar: unknown variant, expected `json` or `regex`",
                )
            )
        if "max_new_tokens" not in params:
            params["max_new_tokens"] = 100  # serde default
        req["parameters"] = params
        return req

    def _validate(self, req: dict[str, Any]) -> tuple[str, int, int, bool]:
        """``Validation::validate``; returns (prompt used, input length, max_new_tokens,
        json grammar)."""
        p = req["parameters"]
        inputs: str = req["inputs"]
        best_of = p.get("best_of") or 1
        sampling = bool(p.get("do_sample")) or any(
            p.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        if best_of > 1 and not sampling:
            raise _validation("you must use sampling when `best_of` is > 1")
        temperature = p.get("temperature")
        if temperature is not None and temperature <= 0:
            raise _validation("`temperature` must be strictly positive")
        rp = p.get("repetition_penalty")
        if rp is not None and rp <= 0:
            raise _validation("`repetition_penalty` must be strictly positive")
        fp = p.get("frequency_penalty")
        if fp is not None and not -2.0 <= fp <= 2.0:
            raise _validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = p.get("top_p")
        if top_p is not None and not 0.0 < top_p < 1.0:
            raise _validation("`top_p` must be > 0.0 and < 1.0")
        typical_p = p.get("typical_p")
        if typical_p is not None and not 0.0 < typical_p < 1.0:
            raise _validation("`typical_p` must be > 0.0 and < 1.0")
        top_k = p.get("top_k")
        if top_k is not None and top_k <= 0:
            raise _validation("`top_k` must be strictly positive")
        max_new = p.get("max_new_tokens")
        if max_new == 0:
            raise _validation("`max_new_tokens` must be strictly positive")
        stop = p.get("stop", [])
        if len(stop) > self.max_stop_sequences:
            raise _validation(
                f"`stop` supports up to {self.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}"
            )
        if p.get("seed") is not None and best_of > 1:
            raise _validation("`seed` must not be set when `best_of` > 1")
        if not inputs:
            raise _validation("`inputs` cannot be empty")
        truncate = p.get("truncate")
        if truncate is not None and (truncate == 0 or truncate > self.max_input_tokens):
            raise _validation(
                "`truncate` must be strictly positive and less than "
                f"{self.max_input_tokens}. Given: {truncate}"
            )
        words = inputs.split()
        if truncate is not None and len(words) > truncate:
            words = words[-truncate:]
            inputs = " ".join(words)
        input_length = len(words)
        if max_new is None:
            max_new = max(self.max_total_tokens - input_length, 0)
        if input_length + max_new > self.max_total_tokens:
            raise _validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if input_length > self.max_input_tokens:
            raise _validation(
                f"`inputs` must have less than {self.max_input_tokens} tokens. "
                f"Given: {input_length}"
            )
        json_mode = False
        grammar = p.get("grammar")
        if grammar is not None:
            value = grammar.get("value")
            if grammar["type"] == "json":
                if isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except ValueError as exc:
                        raise _validation(f"grammar is not valid: {exc}") from None
                if not isinstance(value, dict):
                    raise _validation("grammar is not supported")
                json_mode = True
        return inputs, input_length, int(max_new), json_mode

    def _check_adapter(self, req: dict[str, Any]) -> None:
        adapter = req["parameters"].get("adapter_id")
        with self._adapter_lock:
            self._adapter_ids.append(adapter)
        known = self.adapters is None or adapter is None or adapter in self.adapters
        if self.strict_adapters and not known:
            raise _InferError(
                "generation", f"Request failed during generation: adapter `{adapter}` is not loaded"
            )

    def _seed(self, req: dict[str, Any]) -> int | None:
        p = req["parameters"]
        sampling = (
            bool(p.get("do_sample"))
            or p.get("temperature") not in (None, 1.0)
            or p.get("top_k") not in (None, 0)
            or (p.get("top_p") is not None and p["top_p"] < 1.0)
            or (p.get("typical_p") is not None and p["typical_p"] < 1.0)
        )
        if not sampling:
            return None
        seed = p.get("seed")
        return int(seed) if seed is not None else stable_seed("tgi-seed", req["inputs"])

    # ------------------------------------------------------------- responses
    async def _unary(
        self, request: web.Request, req: dict[str, Any], *, compat: bool
    ) -> web.StreamResponse:
        start = time.monotonic()
        assert self._permits is not None
        best_of = req["parameters"].get("best_of") or 1
        if best_of > 1:  # Infer::generate_best_of -> Validation::validate_best_of, first
            if self.max_best_of == 1:
                err = _validation("`best_of` != 1 is not allowed for this endpoint")
                raise _Abort(self._infer_error(err))
            if best_of > self.max_best_of:
                err = _validation(
                    f"`best_of` must be > 0 and <= {self.max_best_of}. Given: {best_of}"
                )
                raise _Abort(self._infer_error(err))
        if queued_failure := await self._queued_failure():
            raise _Abort(self._json(queued_failure[1], queued_failure[0]))
        if self._permits.locked():
            raise _Abort(self._infer_error(_InferError("overloaded", "Model is overloaded")))
        async with self._permits:
            try:
                prompt, input_length, max_new, json_mode = self._validate(req)
                self._check_adapter(req)
            except _InferError as err:
                raise _Abort(self._infer_error(err)) from None
            queued = time.monotonic()
            await self._simulate_latency()
            begun = time.monotonic()
            gen = self._run(prompt, req, max_new, json_mode)
            for i in range(len(gen.tokens) + 1):
                fault = self._fault(i)
                if fault == "drop":
                    self._drop(request)
                    raise _Abort(web.Response(status=200))
                if fault == "error":
                    raise _Abort(self._infer_error(self._fault_error()))
                if i < len(gen.tokens):
                    await self._pace(i)
        params = req["parameters"]
        text = self._output_text(req, gen)
        body: dict[str, Any] = {"generated_text": text}
        if params.get("details") or params.get("decoder_input_details"):
            details = self._details(req, gen, prompt)
            if best_of > 1:
                others = {"generated_text": text, **details}
                others.pop("best_of_sequences", None)
                details["best_of_sequences"] = [others] * (best_of - 1)
            body["details"] = details
        end = time.monotonic()
        inference = end - begun
        headers = {
            "Content-Type": "application/json",
            "x-compute-type": self.compute_type,
            "x-compute-time": repr(end - start),
            "x-compute-characters": str(len(req["inputs"])),
            "x-total-time": str(int((end - start) * 1000)),
            "x-validation-time": str(int((queued - start) * 1000)),
            "x-queue-time": str(int((begun - queued) * 1000)),
            "x-inference-time": str(int(inference * 1000)),
            "x-time-per-token": str(int(inference * 1000 / gen.completion_tokens)),
            "x-prompt-tokens": str(input_length),
            "x-generated-tokens": str(gen.completion_tokens),
        }
        payload = [body] if compat else body
        return web.Response(status=200, body=compact_json(payload), headers=headers)

    async def _stream(self, request: web.Request, req: dict[str, Any]) -> web.StreamResponse:
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-compute-type": self.compute_type,
            "x-compute-characters": str(len(req["inputs"])),
            "X-Accel-Buffering": "no",
        }
        resp = await self._open_stream(request, headers)
        params = req["parameters"]
        assert self._permits is not None
        try:
            if (params.get("best_of") or 1) != 1:
                raise _validation("`best_of` != 1 is not supported when streaming tokens")
            if params.get("decoder_input_details"):
                raise _validation(
                    "`decoder_input_details` == true is not supported when streaming tokens"
                )
            if queued_failure := await self._queued_failure():
                if await self._write(request, resp, self._event(queued_failure[1])):
                    return await self._finish(request, resp)
                return resp
            if self._permits.locked():
                raise _InferError("overloaded", "Model is overloaded")
            async with self._permits:
                prompt, input_length, max_new, json_mode = self._validate(req)
                self._check_adapter(req)
                await self._simulate_latency()
                gen = self._run(prompt, req, max_new, json_mode)
                text = self._output_text(req, gen)
                for step in range(len(gen.tokens) + 1):
                    fault = self._fault(step)
                    if fault == "drop":
                        self._drop(request)
                        return resp
                    if fault == "error":
                        raise self._fault_error()
                    if step == len(gen.tokens):
                        break
                    await self._pace(step)
                    last = step == len(gen.tokens) - 1
                    event: dict[str, Any] = {
                        "index": step + 1,
                        "token": _token(gen.tokens[step]),
                        "generated_text": text if last else None,
                        "details": None,
                    }
                    if top_n := params.get("top_n_tokens"):
                        event["top_tokens"] = [
                            _token(t) for t in alternatives(gen.tokens[step], top_n)
                        ]
                    if last and params.get("details"):
                        event["details"] = {
                            "finish_reason": _FINISH[gen.finish],
                            "generated_tokens": gen.completion_tokens,
                            "seed": self._seed(req),
                            "input_length": input_length,
                        }
                    if not await self._write(request, resp, self._event(event)):
                        return resp
        except _InferError as err:
            if not await self._write(request, resp, self._event(err.body())):
                return resp
        return await self._finish(request, resp)

    def _run(self, prompt: str, req: dict[str, Any], max_new: int, json_mode: bool) -> Generation:
        return self.generate(
            prompt,
            max_tokens=max_new,
            stop=req["parameters"].get("stop", []),
            json_mode=json_mode,
            length_first=True,
            stop_mode="suffix",
        )

    @staticmethod
    def _output_text(req: dict[str, Any], gen: Generation) -> str:
        if req["parameters"].get("return_full_text"):
            return str(req["inputs"]) + gen.text
        return gen.text

    def _details(self, req: dict[str, Any], gen: Generation, prompt: str) -> dict[str, Any]:
        prefill: list[dict[str, Any]] = []
        if req["parameters"].get("decoder_input_details"):
            for i, word in enumerate(prompt.split()):
                logprob = None if i == 0 else token_logprob(word)
                prefill.append({"id": token_id(word), "text": word, "logprob": logprob})
        details: dict[str, Any] = {
            "finish_reason": _FINISH[gen.finish],
            "generated_tokens": gen.completion_tokens,
            "seed": self._seed(req),
            "prefill": prefill,
            "tokens": [_token(t) for t in gen.tokens],
        }
        if top_n := req["parameters"].get("top_n_tokens"):
            details["top_tokens"] = [
                [_token(a) for a in alternatives(t, top_n)] for t in gen.tokens
            ]
        return details

    async def _queued_failure(self) -> tuple[int, dict[str, str]] | None:
        """The next error queued by :meth:`fail_next_tgi` (status, body), after the delay."""
        with self._lock:
            failure = self._infer_failures.popleft() if self._infer_failures else None
        if failure is None:
            return None
        await self._simulate_latency()
        status, message, error_type = failure
        return status, {"error": message, "error_type": error_type}

    def _fault_error(self) -> _InferError:
        """The error ``error_after_tokens`` injects, of kind ``error_type``."""
        return _InferError(self.error_type, tgi_error_text(self.error_type, self._error_message))

    def _event(self, value: Any) -> bytes:
        return (b"data: " if self.sse_space else b"data:") + compact_json(value) + b"\n\n"

    def _infer_error(self, err: _InferError) -> web.Response:
        return self._json(err.body(), err.status)

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=compact_json(body), headers={"Content-Type": "application/json"}
        )


def _token(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text)
