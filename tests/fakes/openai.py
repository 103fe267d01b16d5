"""Fake OpenAI-compatible server, shaped the way vLLM's OpenAI server answers (vLLM ~0.10/0.11).

Wire format reproduced from vllm-project/vllm (``vllm/entrypoints/openai/``):

* ``api_server.py``: routes ``GET /health`` (200, empty body), ``GET /version``
  (``{"version": ...}``), ``GET /v1/models`` (``JSONResponse(models.model_dump())``, so every
  field is present, nulls included), ``POST /v1/chat/completions`` and ``/v1/completions``
  (``ErrorResponse`` -> ``JSONResponse(status_code=error.code)``, a full response ->
  ``JSONResponse(model_dump())``, a stream -> ``StreamingResponse(media_type=
  "text/event-stream")``). ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` exist
  only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set (here: ``enable_lora=True``); they
  answer ``Response(status_code=200, content=<success text>)`` or the ``ErrorResponse``.
  Unknown routes answer FastAPI's 404 ``{"detail": "Not Found"}``.
* ``protocol.py`` (``engine/protocol.py`` in newer trees): ``ErrorResponse {"error":
  {"message", "type", "param", "code"}}`` (``ErrorInfo``; older releases used the flat
  ``{"object": "error", "message", "type", "param", "code"}``, see ``legacy_errors``);
  ``ModelCard`` (``id, object="model", created, owned_by="vllm", root, parent,
  max_model_len, permission=[ModelPermission]``); ``UsageInfo`` field order
  ``prompt_tokens, total_tokens, completion_tokens, prompt_tokens_details``;
  ``StreamOptions.include_usage`` *defaults to True* (``stream_options: {}`` asks for usage);
  ``ChatCompletionRequest`` fields (``max_tokens`` / ``max_completion_tokens``, ``n``,
  ``stop`` str or list, ``seed``, ``temperature``, ``top_p``, ``response_format``
  ``{"type": "json_object"}`` / ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}``, vLLM extras ``top_k``, ``repetition_penalty``, ``structured_outputs``
  ``{"json"|"regex"|"choice"|"grammar": ...}`` (newer) and ``guided_json`` /
  ``guided_regex`` / ``guided_choice`` (older); both are accepted and only recorded) and
  its validators: "Stream options can only be defined when `stream=True`.", "When
  response_format type is 'json_schema', the 'json_schema' field must be provided.", "You
  can only use one kind of constraints for structured outputs ('json', 'regex' or
  'choice')." (pydantic wraps these in a longer ``RequestValidationError`` text; the fake
  sends the inner sentence).
* ``serving_engine.py`` ``_check_model``: 404 ``NotFoundError`` "The model `{model}` does not
  exist."; ``_validate_input``: 400 "This model's maximum context length is {L} tokens.
  However, your request has {n} input tokens. Please reduce the length of the input
  messages." and "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's
  maximum context length is {L} tokens and your request has {n} input tokens ({m} > {L} -
  {n})."; ``create_error_response`` defaults (``BadRequestError``, 400, ``param`` null);
  ``create_streaming_error_response`` is ``json.dumps(ErrorResponse.model_dump())`` (so,
  unlike the chunks, *with* spaces after ``:`` and ``,``).
* ``sampling_params.py`` ``_verify_args`` (``ValueError`` -> 400 ``BadRequestError``), in
  this order: "n must be at least 1, got {n}.", "repetition_penalty must be greater than
  zero, got {x}.", "temperature must be non-negative, got {t}.", "top_p must be in (0, 1],
  got {p}.", "top_k must be 0 (disable), or at least 1, got {k}.", "max_tokens must be at
  least 1, got {m}." (floats printed the Python way: ``-1.0``).
* ``serving_chat.py`` ``chat_completion_stream_generator``: chunks are
  ``model_dump_json(exclude_unset=True)`` as ``data: {...}\\n\\n``; the first chunk per choice
  carries ``delta {"role": "assistant", "content": ""}`` and is sent with the first engine
  output; then one chunk per generated token ``delta {"content": ...}`` (the EOS token gives
  ``"content": ""``); the chunk of the last token carries ``finish_reason`` and
  ``stop_reason`` (the matched stop string, else null); with ``include_usage`` a last chunk
  ``{"choices": [], "usage": {...}}`` (``exclude_unset, exclude_none``); then ``data:
  [DONE]``. An exception inside the generator yields ``data: {error json}`` and then ``data:
  [DONE]``, after the 200 status was sent. ``chat_completion_full_generator``: the message is
  ``ChatMessage`` (``role, content, refusal, annotations, audio, function_call,
  tool_calls=[], reasoning_content``), finish_reason ``stop`` / ``length``, ``stop_reason``.
  Response ``model`` is the first served model name, or the LoRA adapter's name
  (``models.model_name(lora_request)``). Ids are ``chatcmpl-{X-Request-Id header or uuid
  hex}`` / ``cmpl-...``.
* ``serving_completion.py``: stream chunks are ``model_dump_json(exclude_unset=False)``
  (``{"id","object":"text_completion","created","model","choices":[{"index","text",
  "logprobs","finish_reason","stop_reason"}],"usage":null}``); no role chunk; usage chunk as
  for chat.
* ``v1/engine/detokenizer.py``: while a request with stop strings is unfinished, the last
  ``max(len(stop)) - 1`` characters are withheld from the stream (so a stop string that
  arrives split over tokens never leaks); the end of the stream carries them.
* ``serving_models.py``: ``load_lora_adapter`` -> 200 "Success: LoRA adapter '{name}' added
  successfully."; 400 ``InvalidUserInput`` "Both 'lora_name' and 'lora_path' must be
  provided." / "The lora adapter '{name}' has already been loaded. If you want to load the
  adapter in place, set 'load_inplace' to True." (``load_inplace: true`` reloads); a path
  the engine cannot find -> 404 ``NotFoundError`` "Loading lora {name} failed: No adapter
  found for {path}" (worker_manager's message; see ``missing_lora_paths``);
  ``unload_lora_adapter`` -> 200 "Success: LoRA adapter '{name}' removed successfully.", 400
  "'lora_name' needs to be provided to unload a LoRA adapter.", 404 ``NotFoundError`` "The
  lora adapter '{name}' cannot be found."; ``show_available_models`` lists the base model
  card(s) (``root`` = model path, ``max_model_len``) then one card per adapter (``root`` =
  adapter path, ``parent`` = base model name, ``max_model_len`` null).
  ``--max-loras`` limits adapters *per batch* and never makes a load fail, so
  ``max_loras`` is only recorded.

Flavours (``flavour=``): ``"vllm"`` (the default, all of the above); ``"tgi"``, TGI 2.x's
messages API (huggingface/text-generation-inference ``router/src/server.rs``
``chat_completions``): events framed ``data:`` without a space (axum ``Event::json_data``),
``[DONE]`` too; one chunk per token ``{"object": "chat.completion.chunk", "id": "",
"created", "model", "system_fingerprint": "{version}-native", "choices": [{"index", "delta":
{"role": "assistant", "content"}, "logprobs": null, "finish_reason"}], "usage"}``, the last
token's chunk with ``finish_reason`` and (with ``include_usage``) ``usage``, no separate
usage chunk, no role-only chunk, no hold-back of stop strings; the whole answer as
``{"object": "chat.completion", "id": "", ..., "choices": [{"index", "message": {"role",
"content"}, "logprobs": null, "finish_reason"}], "usage"}``; an error inside the stream is
``generate_stream_internal``'s ``Event::from(InferError)``, ``{"error", "error_type"}`` of
kind ``error_type`` (:func:`.tgi.tgi_error_text`), then ``data:[DONE]``, and a non-streaming
request gets it with TGI's status. ``"llama.cpp"``: vLLM's shapes, except that an error
inside the stream is sent the way llama.cpp's server did before its split into
server-context.cpp (``server_sent_event(sink, "error", error_data)``): an ``error:`` field
``{"code", "message", "type"}`` (``format_error_response``; here ``error_type`` validation
-> 400 ``invalid_request_error``, overloaded -> 503 ``unavailable_error``, else 500
``server_error``), then ``data: [DONE]``. TGI's chat also stops as TGI does
(``max_new_tokens`` first, the stop sequence kept at the end of the text) and reports
``FinishReason::format(true)``: ``stop`` (EOS), ``length``, ``stop_sequence``. Otherwise, in
every flavour, the model's stopping rules, ``/v1/completions`` chunks and HTTP error bodies
stay vLLM's.

Simplifications: prompts are not chat-templated (prompt = message contents joined by a
space); ``logprobs``, tools, ``echo``, beam search, token-id prompts and
``continuous_usage_stats`` are not modelled; body/type errors are 400 ``BadRequestError``
with a short message instead of pydantic's text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeGuard

from aiohttp import web

from .llm import FakeLLMServer, Generation, _Abort, compact_json
from .tgi import TGI_ERRORS, tgi_error_text

_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
Flavour = Literal["vllm", "tgi", "llama.cpp"]
#: llama.cpp's ``format_error_response`` (code, type) for an ``error_type``.
# TGI's FinishReason::format(true) (router/src/lib.rs): only EOS becomes OpenAI's "stop".
_TGI_FINISH = {"eos": "stop", "length": "length", "stop": "stop_sequence"}
_LLAMA_CPP_ERRORS = {
    "validation": (400, "invalid_request_error"),
    "overloaded": (503, "unavailable_error"),
}


def vllm_error(
    message: str,
    err_type: str = "BadRequestError",
    code: int = 400,
    param: str | None = None,
    *,
    legacy: bool = False,
) -> dict[str, Any]:
    """vLLM's ``ErrorResponse`` body (``legacy``: the pre-0.10 flat shape)."""
    if legacy:
        return {"object": "error", "message": message, "type": err_type, "param": param,
                "code": code}  # fmt: skip
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _f(value: Any) -> str:
    """How ``f"{x}"`` prints a pydantic ``float`` field (ints become ``1.0``)."""
    return repr(float(value)) if isinstance(value, int | float) else str(value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class FakeOpenAI(FakeLLMServer):
    """In-process stand-in for vLLM's OpenAI-compatible server (see module docstring).

    ``models``: the served model names (``--served-model-name``); responses name the first.
    ``enable_lora``: expose the runtime LoRA endpoints; ``lora_modules``: adapters loaded at
    start (``--lora-modules name=path``).
    """

    inference_paths: ClassVar[frozenset[str]] = frozenset(
        {"/v1/chat/completions", "/v1/completions"}
    )

    def __init__(
        self,
        *,
        models: Sequence[str] = ("fake/vllm-model",),
        max_model_len: int = 4096,
        model_path: str | None = None,
        enable_lora: bool = False,
        max_loras: int | None = None,
        lora_modules: Mapping[str, str] | None = None,
        legacy_errors: bool = False,
        version: str = "0.11.0",
        flavour: Flavour = "vllm",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        if not models:
            raise ValueError("at least one served model name is required")
        self.models = list(models)
        self.max_model_len = max_model_len
        self.model_path = model_path or self.models[0]
        self.enable_lora = enable_lora
        self.max_loras = max_loras
        self.legacy_errors = legacy_errors
        self.version = version
        self.flavour = flavour
        #: LoRA paths the "engine" cannot find: loading one answers vLLM's 404.
        self.missing_lora_paths: set[str] = set()
        #: Seconds ``/v1/load_lora_adapter`` takes before it answers (weights being read).
        self.lora_load_delay_s = 0.0
        self._adapters: dict[str, str] = dict(lora_modules or {})
        self._adapter_lock = threading.Lock()
        self._created = int(time.time())

    # ------------------------------------------------------------------ public
    @property
    def loaded_adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters, in load order."""
        with self._adapter_lock:
            return list(self._adapters)

    @property
    def lora_paths(self) -> dict[str, str]:
        """Loaded adapter name -> the ``lora_path`` it was loaded from."""
        with self._adapter_lock:
            return dict(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter directly (as ``--lora-modules`` would), without HTTP."""
        with self._adapter_lock:
            self._adapters[name] = path

    def generation(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        json_mode: bool = False,
        chat: bool = True,
    ) -> Generation:
        """What a request with this prompt generates: vLLM's stop rules, or TGI's for chat
        in the ``"tgi"`` flavour (the stop sequence stays in the text). For chat, the
        prompt is the message contents joined by a space; ``max_tokens`` None means
        ``max_model_len - prompt tokens``, as vLLM does."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_tokens = len(prompt.split())
        limit = self.max_model_len - prompt_tokens
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        tgi = self.flavour == "tgi" and chat
        return self.generate(
            prompt,
            max_tokens=limit,
            stop=stops,
            json_mode=json_mode,
            length_first=tgi,
            stop_mode="suffix" if tgi else "truncate",
        )

    def expected_text(self, prompt: str, **kwargs: Any) -> str:
        """The text a request with this prompt gets back (see :meth:`generation`)."""
        return self.generation(prompt, **kwargs).text

    def fail_next_openai(
        self,
        status: int,
        message: str,
        err_type: str = "BadRequestError",
        times: int = 1,
        param: str | None = None,
    ) -> None:
        """Queue vLLM-shaped errors for the next inference requests."""
        self.fail_next(
            status, vllm_error(message, err_type, status, param, legacy=self.legacy_errors), times
        )

    def models_body(self) -> dict[str, Any]:
        """The ``GET /v1/models`` body."""
        cards = [
            self._card(name, self.model_path, None, self.max_model_len) for name in self.models
        ]
        cards += [self._card(n, p, self.models[0], None) for n, p in self.lora_paths.items()]
        return {"object": "list", "data": cards}

    # ---------------------------------------------------------------- routing
    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        if self.enable_lora:
            app.router.add_post("/v1/load_lora_adapter", self._load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_route("*", "/{tail:.*}", self._not_found)

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._json({"detail": "Not Found"}, 404)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return self._json({"version": self.version})

    async def _models(self, request: web.Request) -> web.Response:
        return self._json(self.models_body())

    def _card(
        self, name: str, root: str, parent: str | None, max_len: int | None
    ) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": self._created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    # ------------------------------------------------------------------- LoRA
    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        if not isinstance(body, dict):
            return self._error("Invalid request body: expected a JSON object.")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        name, path = str(name), str(path)
        await asyncio.sleep(self.lora_load_delay_s)
        with self._adapter_lock:
            if name in self._adapters and not body.get("load_inplace"):
                return self._error(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                )
            if path in self.missing_lora_paths:
                return self._error(
                    f"Loading lora {name} failed: No adapter found for {path}",
                    "NotFoundError",
                    404,
                )
            self._adapters[name] = path
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not name:
            return self._error(
                "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
            )
        with self._adapter_lock:
            if name not in self._adapters:
                return self._error(
                    f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404
                )
            del self._adapters[name]
        return web.Response(
            status=200, text=f"Success: LoRA adapter '{name}' removed successfully."
        )

    # -------------------------------------------------------------- inference
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve(request, chat=True)
        except _Abort as abort:
            return abort.response

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve(request, chat=False)
        except _Abort as abort:
            return abort.response

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        req = await self._read_json(request)
        if not isinstance(req, dict):
            raise _Abort(self._error("Invalid request body: expected a JSON object."))
        prompts = self._prompts(req, chat)
        stream = bool(req.get("stream"))
        if req.get("stream_options") and not stream:
            raise _Abort(self._error("Stream options can only be defined when `stream=True`."))
        json_mode = self._json_mode(req)
        served = self._served_name(req.get("model"))
        prompt_tokens = [len(p.split()) for p in prompts]
        for count in prompt_tokens:
            self._check_length(req, count, chat)
        stops = req.get("stop")
        stop_list = [stops] if isinstance(stops, str) else list(stops or [])
        n = self._sampling_checks(req, chat)
        requested = req.get("max_completion_tokens") if chat else None
        requested = requested or req.get("max_tokens")
        gens: list[Generation] = []
        for prompt in prompts:
            gen = self.generation(
                prompt, max_tokens=requested, stop=stop_list, json_mode=json_mode, chat=chat
            )
            gens.extend([gen] * n)
        await self._simulate_latency()
        base_id = request.headers.get("X-Request-Id") or req.get("request_id") or uuid.uuid4().hex
        rid = ("chatcmpl-" if chat else "cmpl-") + str(base_id)
        if stream:
            opts = req.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage", True) is not False
            return await self._stream(request, rid, served, gens, stop_list, chat, include_usage)
        return await self._unary(request, rid, served, gens, chat)

    def _prompts(self, req: dict[str, Any], chat: bool) -> list[str]:
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise _Abort(self._error("Field required: messages (a list of messages)."))
            return [" ".join(_content_text(m.get("content")) for m in messages)]
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        raise _Abort(self._error("Field required: prompt (a string or a list of strings)."))

    def _json_mode(self, req: dict[str, Any]) -> bool:
        rf = req.get("response_format")
        if (
            isinstance(rf, dict)
            and rf.get("type") == "json_schema"
            and rf.get("json_schema") is None
        ):
            raise _Abort(
                self._error(
                    "When response_format type is 'json_schema', the 'json_schema' field "
                    "must be provided."
                )
            )
        so = req.get("structured_outputs")
        if isinstance(so, dict):
            if sum(so.get(k) is not None for k in ("json", "regex", "choice")) > 1:
                raise _Abort(
                    self._error(
                        "You can only use one kind of constraints for structured outputs "
                        "('json', 'regex' or 'choice')."
                    )
                )
            if so.get("json") is not None or so.get("json_object"):
                return True
        if req.get("guided_json") is not None:
            return True
        return isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")

    def _served_name(self, model: Any) -> str:
        """The response's model name; 404 for a model that is neither served nor loaded."""
        if not model or model in self.models:
            return self.models[0]
        if model in self.loaded_adapters:
            return str(model)
        raise _Abort(self._error(f"The model `{model}` does not exist.", "NotFoundError", 404))

    def _check_length(self, req: dict[str, Any], count: int, chat: bool) -> None:
        limit = self.max_model_len
        if count >= limit:
            raise _Abort(
                self._error(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"request has {count} input tokens. Please reduce the length of the input "
                    "messages."
                )
            )
        mt = (req.get("max_completion_tokens") if chat else None) or req.get("max_tokens")
        if _is_int(mt) and count + mt > limit:
            raise _Abort(
                self._error(
                    f"'max_tokens' or 'max_completion_tokens' is too large: {mt}. This model's "
                    f"maximum context length is {limit} tokens and your request has {count} "
                    f"input tokens ({mt} > {limit} - {count})."
                )
            )

    def _sampling_checks(self, req: dict[str, Any], chat: bool) -> int:
        """SamplingParams._verify_args, in vLLM's order; returns ``n``."""
        n = req.get("n")
        n = 1 if n is None else n
        if not _is_int(n) or n < 1:
            raise _Abort(self._error(f"n must be at least 1, got {n}."))
        fields = ("repetition_penalty", "temperature", "top_p", "top_k")
        for name in fields:
            value = req.get(name)
            if value is not None and not (_is_int(value) or isinstance(value, float)):
                raise _Abort(self._error(f"{name}: Input should be a valid number"))
        rp, temp, top_p, top_k = (req.get(k) for k in fields)
        mt = (req.get("max_completion_tokens") if chat else None) or req.get("max_tokens")
        checks = (
            (rp is None or rp > 0, f"repetition_penalty must be greater than zero, got {_f(rp)}."),
            (temp is None or temp >= 0, f"temperature must be non-negative, got {_f(temp)}."),
            (top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1], got {_f(top_p)}."),
            (
                top_k is None or top_k >= -1,
                f"top_k must be 0 (disable), or at least 1, got {top_k}.",
            ),
            (not _is_int(mt) or mt >= 1, f"max_tokens must be at least 1, got {mt}."),
        )
        for ok, message in checks:
            if not ok:
                raise _Abort(self._error(message))
        return n

    # ------------------------------------------------------------- responses
    async def _run_unary(self, request: web.Request, gens: list[Generation]) -> None:
        """Pace the whole generation; apply faults (non-streaming flavour)."""
        steps = max(len(g.tokens) for g in gens)
        for i in range(steps + 1):
            fault = self._fault(i)
            if fault == "drop":
                self._drop(request)
                raise _Abort(web.Response(status=200))
            if fault == "error":
                if self.flavour == "tgi":
                    status = TGI_ERRORS[self.error_type][0]
                    raise _Abort(self._json(self._tgi_error_event(), status))
                raise _Abort(self._error(self._error_message))
            if i < steps:
                await self._pace(i)

    async def _unary(
        self, request: web.Request, rid: str, model: str, gens: list[Generation], chat: bool
    ) -> web.StreamResponse:
        await self._run_unary(request, gens)
        created = int(time.time())
        if self.flavour == "tgi" and chat:
            return self._json(self._tgi_unary(model, created, gens))
        choices: list[dict[str, Any]] = []
        for i, gen in enumerate(gens):
            finish = "length" if gen.finish == "length" else "stop"
            if chat:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": gen.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                }
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": gen.stop_sequence,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": gen.text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": gen.stop_sequence,
                        "prompt_logprobs": None,
                    }
                )
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if chat:
            body["service_tier"] = None
            body["system_fingerprint"] = None
        body["usage"] = {**_usage(gens), "prompt_tokens_details": None}
        if chat:
            body["prompt_logprobs"] = None
        body["kv_transfer_params"] = None
        return self._json(body)

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        model: str,
        gens: list[Generation],
        stops: list[str],
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        tgi = self.flavour == "tgi" and chat
        holdback = 0 if tgi else max((len(s) for s in stops), default=1) - 1
        sent = [""] * len(gens)
        resp = await self._open_stream(request, dict(_SSE))
        data = b"data:" if self.flavour == "tgi" else b"data: "

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if tgi:
                body = {"object": obj, "id": "", "created": created, "model": model,
                        "system_fingerprint": f"{self.version}-native", "choices": choices,
                        "usage": None}  # fmt: skip
            body.update(extra)
            return data + compact_json(body) + b"\n\n"

        steps = max(len(g.tokens) for g in gens)
        for step in range(steps + 1):
            fault = self._fault(step)
            if fault == "drop":
                self._drop(request)
                return resp
            if fault == "error":
                if not await self._write(
                    request, resp, self._stream_error() + data + b"[DONE]\n\n"
                ):
                    return resp
                return await self._finish(request, resp)
            if step == steps:
                break
            await self._pace(step)
            out = b""
            if chat and step == 0 and not tgi:  # role chunks go out with the first output
                for i in range(len(gens)):
                    role = {"role": "assistant", "content": ""}
                    out += chunk([_stream_choice(i, role, None, None, chat, final=False)])
            for i, gen in enumerate(gens):
                if step >= len(gen.tokens):
                    continue
                last = step == len(gen.tokens) - 1
                text = gen.texts[step]
                visible = text if last else text[: max(len(sent[i]), len(text) - holdback)]
                delta, sent[i] = visible[len(sent[i]) :], visible
                finish = ("length" if gen.finish == "length" else "stop") if last else None
                if tgi:
                    role = {"role": "assistant", "content": delta}
                    finish = _TGI_FINISH[gen.finish] if last else None
                    choice = {"index": i, "delta": role, "logprobs": None, "finish_reason": finish}
                    usage = _usage(gens) if last and include_usage else None
                    out += chunk([choice], usage=usage)
                    continue
                payload: Any = {"content": delta} if chat else delta
                choice = _stream_choice(i, payload, finish, gen.stop_sequence, chat, final=last)
                out += chunk([choice]) if chat else chunk([choice], usage=None)
            if not await self._write(request, resp, out):
                return resp
        tail = b""
        if include_usage and not tgi:
            tail += chunk([], usage=_usage(gens))
        tail += data + b"[DONE]\n\n"
        if not await self._write(request, resp, tail):
            return resp
        return await self._finish(request, resp)

    # ---------------------------------------------------------------- helpers
    def _stream_error(self) -> bytes:
        """The event for an error inside a started stream, in this flavour's form."""
        if self.flavour == "tgi":
            return b"data:" + compact_json(self._tgi_error_event()) + b"\n\n"
        if self.flavour == "llama.cpp":
            code, kind = _LLAMA_CPP_ERRORS.get(self.error_type, (500, "server_error"))
            body = {"code": code, "message": self._error_message, "type": kind}
            return b"error: " + compact_json(body) + b"\n\n"
        err = vllm_error(self._error_message, legacy=self.legacy_errors)
        return b"data: " + json.dumps(err).encode() + b"\n\n"

    def _tgi_error_event(self) -> dict[str, str]:
        message = tgi_error_text(self.error_type, self._error_message)
        return {"error": message, "error_type": TGI_ERRORS[self.error_type][1]}

    def _tgi_unary(self, model: str, created: int, gens: list[Generation]) -> dict[str, Any]:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": gen.text},
             "logprobs": None, "finish_reason": _TGI_FINISH[gen.finish]}
            for i, gen in enumerate(gens)
        ]  # fmt: skip
        usage = _usage(gens)
        del usage["total_tokens"]  # TGI's Usage order: prompt, completion, total
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"object": "chat.completion", "id": "", "created": created, "model": model,
                "system_fingerprint": f"{self.version}-native", "choices": choices,
                "usage": usage}  # fmt: skip

    def _error(
        self, message: str, err_type: str = "BadRequestError", status: int = 400
    ) -> web.Response:
        return self._json(vllm_error(message, err_type, status, legacy=self.legacy_errors), status)

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=compact_json(body), headers=dict(_JSON))


def _content_text(content: Any) -> str:
    """A chat message's text: a string, or the ``text`` of its ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _usage(gens: list[Generation]) -> dict[str, int]:
    """UsageInfo in vLLM's field order. Prompt tokens count once per prompt, not per choice."""
    prompts: dict[int, int] = {}
    for gen in gens:
        prompts[id(gen)] = gen.prompt_tokens
    prompt_tokens = sum(prompts.values())
    completion = sum(g.completion_tokens for g in gens)
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
    }


def _stream_choice(
    index: int, delta: Any, finish: str | None, stop: str | None, chat: bool, *, final: bool
) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
        if final:
            choice["stop_reason"] = stop
        return choice
    return {
        "index": index,
        "text": delta,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": stop if final else None,
    }
