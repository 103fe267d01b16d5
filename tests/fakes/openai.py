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
request gets it with TGI's status. TGI's chat also stops as TGI does (``max_new_tokens``
first, the stop sequence kept at the end of the text) and reports
``FinishReason::format(true)``: ``stop`` (EOS), ``length``, ``stop_sequence``; its
``/v1/completions`` chunks and HTTP error bodies stay vLLM's.

``"llama.cpp"``: llama.cpp's ``llama-server`` as built from commit 0c1e570 (the one ``make
setup`` builds; ``system_fingerprint`` :data:`LLAMA_CPP_BUILD`), from its ``tools/server/``
(server.cpp routes, server-context.cpp ``handle_completions_impl`` and ``process_token``,
server-task.cpp the results' JSON, server-common.cpp ``oaicompat_chat_params_parse`` and
``format_error_response``, server-schema.cpp the request fields) and checked against the
real server by ``tests/integration/test_llama_cpp_fake_fidelity.py``; nothing of vLLM's:

* Routes: ``GET /health`` and ``/v1/health`` -> ``{"status": "ok"}``; ``GET /v1/models`` and
  ``/models`` -> ``{"models": [an Ollama-style entry], "object": "list", "data": [{"id",
  "aliases", "tags", "object": "model", "created", "owned_by": "llamacpp", "meta": {...,
  "n_ctx"}}]}``; ``POST /v1/chat/completions``, ``/chat/completions``, ``/v1/completions``;
  anything else (``/version``, a GET to a POST route) 404 ``{"error": {"message": "File Not
  Found", "type": "not_found_error", "code": 404}}``. JSON is sent as ``application/json;
  charset=utf-8``, streams as ``text/event-stream``.
* ``model`` is not checked: the loaded model answers, named by its alias (the first of
  ``models``). Ids are ``chatcmpl-`` and 32 random letters and digits, for completions too
  (``X-Request-Id`` is not read).
* Answers: chat ``{"choices": [{"finish_reason", "index", "message": {"role", "content"}}],
  "created", "model", "system_fingerprint", "object": "chat.completion", "usage", "id",
  "timings"}``; completions the same with ``{"text", "index", "logprobs": null,
  "finish_reason"}`` choices and ``"object": "text_completion"``. ``usage`` is
  ``{"completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details":
  {"cached_tokens"}}`` (with ``n`` > 1 or several prompts, the first result's). There is no
  ``stop_reason``: EOS and a stop string are both ``"stop"``, the limit (``max_tokens`` or the
  slot's context) ``"length"``; EOS and stop strings are checked before the limit.
* Streams: ``data: {json}\n\n`` events, then ``data: [DONE]``. Chat chunks are ``{"choices":
  [{"finish_reason", "index", "delta"}], "created", "id", "model", "system_fingerprint",
  "object": "chat.completion.chunk"}``: a role-only chunk ``{"role": "assistant", "content":
  null}`` with the first token, a ``{"content"}`` chunk for each token with text to send
  (none for EOS), then ``finish_reason`` with ``"delta": {}``, then, with
  ``stream_options.include_usage`` (false by default; ``{}`` asks for none), ``{"choices":
  [], ..., "usage"}``; ``timings`` ride on the last of them. Completions: a chunk per token
  (``""`` for EOS and for text held back), then ``{"text": "", "finish_reason"}`` with
  ``usage`` (whatever ``include_usage`` says) and ``timings``. A token's text is held back
  while the unsent text ends with the beginning of a stop string; when the limit ends
  generation there, that text is never streamed (the non-streamed answer has it).
* Errors: ``{"error": {"code", "message", "type"}}`` with the status ``code``
  (``format_error_response``: 400 ``invalid_request_error``, 500 ``server_error``, 503
  ``unavailable_error``, ...). llama.cpp's messages for: "'messages' is required", "Expected
  'messages' to be an array", a ``response_format`` type other than text / json_object /
  json_schema, "[json.exception.out_of_range.403] key 'prompt' not found", server-schema.cpp's
  "Field 'max_tokens': [json.exception.type_error.302] type must be number, but is string"
  and "Field 'n': Value must be between 1 <= value <= {parallel}, but got 3" (``max_tokens``
  -1..INT32_MAX, 0 acting as 1; sampling values out of range are clamped, not refused); a
  body that is not JSON is 500 ``server_error``. A prompt of ``max_model_len`` tokens or more
  is 400 ``exceed_context_size_error`` "request ({n} tokens) exceeds the available context
  size ({L} tokens), try increasing it" with ``n_prompt_tokens`` and ``n_ctx``, streaming or
  not (the first result of a stream, when it is an error, is answered with its status:
  llama.cpp PR #16486); a prompt that fits, with ``max_tokens`` that does not, ends at the
  context with ``"length"``. Accepted where vLLM refuses: an unknown model, ``stream_options``
  without ``stream``, ``json_schema`` without its schema; ``repetition_penalty`` and
  ``structured_outputs`` are ignored (``/v1/completions`` is constrained to JSON only by a
  top-level ``json_schema``).
* Injected errors (``error_after_tokens``; ``error_type`` validation -> 400
  ``invalid_request_error``, overloaded -> 503 ``unavailable_error``, else 500
  ``server_error``): a non-streaming request gets the error answer; a stream gets a
  validation or overloaded error due before any token as that answer too (llama.cpp's
  checks run before the stream starts), any other as ``data: {"error": {"code", "message",
  "type"}}\n\n`` and the end of the body, *without* ``[DONE]`` (``handle_completions_impl``'s
  ``format_error``). ``legacy_errors=True`` is the one-file server.cpp of before PR #16486
  (October 2025) and the split into server-http.cpp / server-context.cpp: every error of a
  stream that answered 200, the first included, as an SSE ``error:`` field ``{"code", "message",
  "type"}`` (``server_sent_event(sink, "error", error_data)``), which SSE client libraries
  drop, then ``data: [DONE]``; the chunks stay the current ones.

Tool calls (``tool_calls`` scripted, see :mod:`.llm`; vLLM and TGI flavours only):

* vLLM (``protocol.py`` ``check_tool_usage``, ``serving_chat.py`` with a tool parser):
  ``tool_choice`` other than ``"none"`` without ``tools`` -> 400 "When using `tool_choice`,
  `tools` must be set."; a named function not among the tools -> 400 "Tool '{name}' has not
  been passed in `tools`."; an unknown ``tool_choice`` string -> 400. The answer's message
  has ``content: null`` and ``tool_calls: [{"id": "chatcmpl-tool-{hex}", "type":
  "function", "function": {"name", "arguments": "<JSON text>"}}]``, ``finish_reason``
  ``tool_calls``. Streamed: the role chunk, then per call ``{"tool_calls": [{"id", "type":
  "function", "index", "function": {"name"}}]}`` and its arguments in pieces ``{"tool_calls":
  [{"index", "function": {"arguments": piece}}]}``, then ``finish_reason`` ``tool_calls``
  with ``delta: {}``, the usage chunk and ``[DONE]``.
* TGI (``router/src/lib.rs`` ``ToolCall``/``DeltaToolCall``, 3.x): the message is
  ``{"role": "assistant", "tool_calls": [{"id": "0", "type": "function", "function":
  {"description": null, "name", "arguments": "<JSON text>"}}]}`` and ``finish_reason``
  ``stop`` (TGI reports EOS, not a tool reason); streamed, each chunk's delta is ``{"role":
  "assistant", "tool_calls": [{"index", "id": "", "type": "function", "function": {"name",
  "arguments"}}]}``, the name on a call's first chunk (arguments ``""``), then ``"name":
  null`` and a piece of the arguments, ``finish_reason`` and usage on the last. A named
  function not among the tools -> 422 ``{"error": "Tool error: Tool {name} not found",
  "error_type": "tool_error"}`` (approximated).

Log probabilities (vLLM flavour; ``protocol.py`` ``ChatCompletionLogProbs`` and
``CompletionLogProbs``, the values the fake model's, see :mod:`.llm`): chat with ``logprobs:
true`` answers ``choices[].logprobs = {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}]}`` with ``top_logprobs`` alternatives per
token (the bytes the token's UTF-8), streamed as each token's chunk's ``logprobs``;
completions with ``logprobs: N`` answer ``{"text_offset", "token_logprobs", "tokens",
"top_logprobs": [{token: logprob}]}`` (N alternatives), per chunk too. The EOS token has no
entry (the fake's simplification), chunks without a token (the role chunk) ``null``.

Simplifications: prompts are not chat-templated (prompt = message contents joined by a
space, and no BOS token is counted); ``logprobs`` in the TGI and llama.cpp flavours, tools in
the llama.cpp flavour, ``echo``,
beam search, token-id prompts and ``continuous_usage_stats`` are not modelled; vLLM's
body/type errors are 400 ``BadRequestError`` with a short message instead of pydantic's
text; llama.cpp's prompt cache is not modelled (``cached_tokens`` 0), its ``timings`` are
invented numbers, a JSON parse error's message is Python's, and grammars, ``n_probs``, SSE
pings and the non-OpenAI routes (``/completion``, ``/tokenize``, ``/slots``, ...) are
absent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NoReturn, TypeGuard

from aiohttp import web

from .llm import FakeLLMServer, Generation, ScriptedCall, Token, _Abort, alternatives, compact_json
from .tgi import TGI_ERRORS, tgi_error_text

_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
Flavour = Literal["vllm", "tgi", "llama.cpp"]
# TGI's FinishReason::format(true) (router/src/lib.rs): only EOS becomes OpenAI's "stop".
_TGI_FINISH = {"eos": "stop", "length": "length", "stop": "stop_sequence"}

#: The llama-server build the llama.cpp flavour reproduces, as ``llama_build_info()`` names it
#: (``b{build number}-{commit}``; a build from a source tree without git history is ``b1``).
LLAMA_CPP_BUILD = "b1-0c1e570"
#: llama.cpp's ``format_error_response``: HTTP status -> ``type``.
_LLAMA_CPP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
#: The status of an injected error of this ``error_type`` (any other: 500 ``server_error``).
_LLAMA_CPP_ERRORS = {"validation": 400, "overloaded": 503}
_LLAMA_CPP_JSON = {"Content-Type": "application/json; charset=utf-8"}
_LLAMA_CPP_SSE = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
_TYPE_ERROR = "[json.exception.type_error.302]"
_ID_CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: What ``GET /v1/models`` says about the model (``meta``): Gemma 3 270M's numbers.
_LLAMA_CPP_META = {"vocab_type": 1, "n_vocab": 262144, "n_ctx_train": 32768, "n_embd": 640,
                   "n_params": 268098176, "size": 246587904, "ftype": "Q4_K - Medium"}  # fmt: skip


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


def llama_cpp_error(message: str, code: int = 400, err_type: str | None = None) -> dict[str, Any]:
    """llama.cpp's error body, ``{"error": format_error_response(message, type)}``."""
    kind = err_type or _LLAMA_CPP_TYPES.get(code, "server_error")
    return {"error": {"code": code, "message": message, "type": kind}}


def _f(value: Any) -> str:
    """How ``f"{x}"`` prints a pydantic ``float`` field (ints become ``1.0``)."""
    return repr(float(value)) if isinstance(value, int | float) else str(value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class FakeOpenAI(FakeLLMServer):
    """In-process stand-in for vLLM's OpenAI-compatible server (see module docstring).

    ``models``: the served model names (``--served-model-name``); responses name the first.
    ``enable_lora``: expose the runtime LoRA endpoints; ``lora_modules``: adapters loaded at
    start (``--lora-modules name=path``). ``version``: vLLM's ``/version`` (and TGI's
    ``system_fingerprint``), or llama.cpp's build (:data:`LLAMA_CPP_BUILD`).

    llama.cpp flavour: ``max_model_len`` is a slot's context (``--ctx-size`` / ``--parallel``),
    ``parallel`` the slots (``n`` may be 1..parallel), ``legacy_errors`` the old server.cpp's
    ``error:`` field for errors inside a stream.
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
        version: str | None = None,
        flavour: Flavour = "vllm",
        parallel: int = 2,
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
        self.flavour = flavour
        self.version = version or (LLAMA_CPP_BUILD if flavour == "llama.cpp" else "0.11.0")
        self.parallel = parallel
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
        """What a request with this prompt generates: vLLM's stop rules (llama.cpp's are the
        same), or TGI's for chat in the ``"tgi"`` flavour (the stop sequence stays in the
        text). For chat, the prompt is the message contents joined by a space; ``max_tokens``
        None means ``max_model_len - prompt tokens``, as vLLM and llama.cpp do."""
        stops = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
        prompt_tokens = len(prompt.split())
        limit = self.max_model_len - prompt_tokens  # llama.cpp: the slot's context fills up
        if self.flavour == "llama.cpp":
            if max_tokens is not None and max_tokens >= 0:  # -1: no limit
                limit = min(limit, max(1, max_tokens))  # checked after a token: 0 acts as 1
        elif max_tokens is not None:
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
        """Queue vLLM-shaped errors (llama.cpp's in that flavour, ``type`` from the status
        unless ``err_type`` is given) for the next inference requests."""
        if self.flavour == "llama.cpp":
            kind = None if err_type == "BadRequestError" else err_type
            self.fail_next(status, llama_cpp_error(message, status, kind), times)
            return
        self.fail_next(
            status, vllm_error(message, err_type, status, param, legacy=self.legacy_errors), times
        )

    def models_body(self) -> dict[str, Any]:
        """The ``GET /v1/models`` body."""
        if self.flavour == "llama.cpp":
            return self._llama_models_body()
        cards = [
            self._card(name, self.model_path, None, self.max_model_len) for name in self.models
        ]
        cards += [self._card(n, p, self.models[0], None) for n, p in self.lora_paths.items()]
        return {"object": "list", "data": cards}

    # ---------------------------------------------------------------- routing
    def _add_routes(self, app: web.Application) -> None:
        if self.flavour == "llama.cpp":
            # tools/server/server.cpp's routes (those the fake models).
            app.router.add_get("/health", self._health)
            app.router.add_get("/v1/health", self._health)
            app.router.add_get("/models", self._models)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/chat/completions", self._chat)
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_route("*", "/{tail:.*}", self._not_found)
            return
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
        if self.flavour == "llama.cpp":
            # server-http.cpp's error handler: any path or method without a handler.
            body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
            return self._json(body, 404, _LLAMA_CPP_JSON)
        return self._json({"detail": "Not Found"}, 404)

    async def _health(self, request: web.Request) -> web.Response:
        if self.flavour == "llama.cpp":
            return self._json({"status": "ok"}, 200, _LLAMA_CPP_JSON)
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return self._json({"version": self.version})

    async def _models(self, request: web.Request) -> web.Response:
        headers = _LLAMA_CPP_JSON if self.flavour == "llama.cpp" else _JSON
        return self._json(self.models_body(), 200, headers)

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
        if self.flavour == "llama.cpp":
            return await self._llama_serve(request, chat=chat)
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
        calls = self._tool_calls_for(req) if chat else []
        await self._simulate_latency()
        base_id = request.headers.get("X-Request-Id") or req.get("request_id") or uuid.uuid4().hex
        rid = ("chatcmpl-" if chat else "cmpl-") + str(base_id)
        if calls:
            opts = req.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage", True) is not False
            return await self._tool_answer(
                request, rid, served, calls, prompt_tokens[0], stream, include_usage
            )
        if stream:
            opts = req.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage", True) is not False
            return await self._stream(
                request, req, rid, served, gens, stop_list, chat, include_usage
            )
        return await self._unary(request, req, rid, served, gens, chat)

    def _tool_calls_for(self, req: dict[str, Any]) -> list[ScriptedCall]:
        """vLLM's check_tool_usage (TGI's tool errors in that flavour), then the calls."""
        tools, choice = req.get("tools"), req.get("tool_choice")
        names = [(t.get("function") or {}).get("name") for t in tools or () if isinstance(t, dict)]
        forced = None
        if isinstance(choice, dict):
            forced = str((choice.get("function") or {}).get("name"))
            if forced not in names:
                if self.flavour == "tgi":
                    body = {
                        "error": f"Tool error: Tool {forced} not found",
                        "error_type": "tool_error",
                    }
                    raise _Abort(self._json(body, 422))
                raise _Abort(self._error(f"Tool '{forced}' has not been passed in `tools`."))
        elif choice not in (None, "none", "auto", "required"):
            raise _Abort(self._error(f"Invalid value for `tool_choice`: {choice!r}."))
        if choice not in (None, "none") and not tools and self.flavour != "tgi":
            raise _Abort(self._error("When using `tool_choice`, `tools` must be set."))
        return self.calls_for(tools, forced, allowed=choice != "none")

    async def _tool_answer(
        self,
        request: web.Request,
        rid: str,
        model: str,
        calls: list[ScriptedCall],
        prompt_tokens: int,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        """The scripted calls as vLLM or TGI send them (see the module docstring)."""
        tgi = self.flavour == "tgi"
        pieces = [self.argument_pieces(c.arguments) for c in calls]
        completion = sum(len(p) for p in pieces) + 1  # + EOS
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                 "completion_tokens": completion}  # fmt: skip
        if tgi:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}  # fmt: skip
        created = int(time.time())
        ids = ["0" if tgi else f"chatcmpl-tool-{uuid.uuid4().hex}" for _ in calls]
        if not stream:
            for i in range(completion):
                await self._pace(i)
            if tgi:
                wire = [{"id": ids[i], "type": "function", "function": {"description": None,
                         "name": c.name, "arguments": c.arguments}}
                        for i, c in enumerate(calls)]  # fmt: skip
                choice = {"index": 0, "message": {"role": "assistant", "tool_calls": wire},
                          "logprobs": None, "finish_reason": "stop"}  # fmt: skip
                return self._json({"object": "chat.completion", "id": "", "created": created,
                                   "model": model, "system_fingerprint":
                                   f"{self.version}-native", "choices": [choice],
                                   "usage": usage})  # fmt: skip
            wire = [{"id": ids[i], "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for i, c in enumerate(calls)]  # fmt: skip
            message = {"role": "assistant", "content": None, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "tool_calls": wire, "reasoning_content": None}  # fmt: skip
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls", "stop_reason": None}  # fmt: skip
            return self._json({"id": rid, "object": "chat.completion", "created": created,
                               "model": model, "choices": [choice], "service_tier": None,
                               "system_fingerprint": None,
                               "usage": {**usage, "prompt_tokens_details": None},
                               "prompt_logprobs": None, "kv_transfer_params": None})  # fmt: skip
        resp = await self._open_stream(request, dict(_SSE))
        data = b"data:" if tgi else b"data: "

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            if tgi:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                body = {"object": "chat.completion.chunk", "id": "", "created": created,
                        "model": model, "system_fingerprint": f"{self.version}-native",
                        "choices": [choice], "usage": extra.get("usage")}  # fmt: skip
            else:
                choice = _stream_choice(0, delta, finish, None, True, final=finish is not None)
                body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [choice], **extra}  # fmt: skip
            return data + compact_json(body) + b"\n\n"

        deltas: list[dict[str, Any]] = [] if tgi else [{"role": "assistant", "content": ""}]
        for i, call in enumerate(calls):
            if tgi:
                first = {"index": i, "id": "", "type": "function",
                         "function": {"name": call.name, "arguments": ""}}  # fmt: skip
                later = [
                    {
                        "index": i,
                        "id": "",
                        "type": "function",
                        "function": {"name": None, "arguments": p},
                    }
                    for p in pieces[i]
                ]
                deltas += [{"role": "assistant", "tool_calls": [d]} for d in [first, *later]]
            else:
                first = {"id": ids[i], "type": "function", "index": i,
                         "function": {"name": call.name}}  # fmt: skip
                later = [{"index": i, "function": {"arguments": p}} for p in pieces[i]]
                deltas += [{"tool_calls": [d]} for d in [first, *later]]
        for step, delta in enumerate(deltas):
            await self._pace(step)
            if tgi:  # TGI's last token chunk carries the finish reason and usage
                last = step == len(deltas) - 1
                end = usage if last and include_usage else None
                out = chunk(delta, "stop" if last else None, usage=end)
            else:
                out = chunk(delta)
            if not await self._write(request, resp, out):
                return resp
        tail = b"" if tgi else chunk({}, "tool_calls")
        if include_usage and not tgi:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [], "usage": usage}  # fmt: skip
            tail += data + compact_json(body) + b"\n\n"
        if not await self._write(request, resp, tail + data + b"[DONE]\n\n"):
            return resp
        return await self._finish(request, resp)

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
        self,
        request: web.Request,
        request_body: dict[str, Any],
        rid: str,
        model: str,
        gens: list[Generation],
        chat: bool,
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
                        "logprobs": _logprobs(request_body, True, gen.tokens),
                        "finish_reason": finish,
                        "stop_reason": gen.stop_sequence,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": gen.text,
                        "logprobs": _logprobs(request_body, False, gen.tokens),
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
        request_body: dict[str, Any],
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
                offset = sum(len(t.text) for t in gen.tokens[:step])
                choice["logprobs"] = _logprobs(
                    request_body, chat, gen.tokens[step : step + 1], offset
                )
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

    # -------------------------------------------------------------- llama.cpp
    # tools/server/: server-context.cpp (handlers, handle_completions_impl, process_token),
    # server-common.cpp (oaicompat_chat_params_parse, format_error_response, format_oai_sse),
    # server-schema.cpp (the request's fields), server-task.cpp (the JSON of each result).
    async def _llama_serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            req: Any = json.loads(raw)
        except ValueError as exc:
            # json::parse throws a parse_error, which ex_wrapper answers as a server error.
            message = f"[json.exception.parse_error.101] parse error: {exc}"
            raise _Abort(self._llama_error(message, 500)) from None
        prompts, json_mode = self._llama_prompts(req, chat)
        stream, include_usage, n_predict, n = self._llama_fields(req)
        for prompt in prompts:
            count = len(prompt.split())
            if count >= self.max_model_len:  # the slot's check, before the stream starts
                message = (
                    f"request ({count} tokens) exceeds the available context size "
                    f"({self.max_model_len} tokens), try increasing it"
                )
                body = llama_cpp_error(message, 400, "exceed_context_size_error")
                body["error"] |= {"n_prompt_tokens": count, "n_ctx": self.max_model_len}
                raise _Abort(self._json(body, 400, _LLAMA_CPP_JSON))
        stops = req.get("stop")
        stop_list = [stops] if isinstance(stops, str) else [s for s in stops or () if s]
        gens: list[Generation] = []
        for prompt in prompts:
            gen = self.generation(prompt, max_tokens=n_predict, stop=stop_list, json_mode=json_mode)
            gens.extend([gen] * n)
        await self._simulate_latency()
        rid = "chatcmpl-" + "".join(secrets.choice(_ID_CHARS) for _ in range(32))  # both APIs
        if stream:
            return await self._llama_stream(request, rid, gens, stop_list, chat, include_usage)
        return await self._llama_unary(request, rid, gens, chat)

    def _llama_prompts(self, req: Any, chat: bool) -> tuple[list[str], bool]:
        """The prompts, and whether the output is constrained to JSON."""
        if not chat:
            # /v1/completions reads data.at("prompt") itself; response_format is not read.
            if not isinstance(req, dict):
                message = f"[json.exception.type_error.304] cannot use at() with {_type(req)}"
                raise _Abort(self._llama_error(message))
            if "prompt" not in req:
                message = "[json.exception.out_of_range.403] key 'prompt' not found"
                raise _Abort(self._llama_error(message))
            prompt = req["prompt"]
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                return list(prompt), req.get("json_schema") is not None
            if not isinstance(prompt, str):
                raise _Abort(
                    self._llama_error(
                        '"prompt" elements must be a string, a list of tokens, a JSON object '
                        "containing a prompt string, or a list of mixed strings & tokens."
                    )
                )
            return [prompt], req.get("json_schema") is not None
        # oaicompat_chat_params_parse: response_format, then the messages.
        body = req if isinstance(req, dict) else {}
        json_mode = body.get("json_schema") is not None
        if "response_format" in body:
            rf = body["response_format"]
            kind = rf.get("type", "") if isinstance(rf, dict) else ""
            if kind in ("json_object", "json_schema"):
                json_mode = True  # json_schema without a schema: any object
            elif kind not in ("", "text"):
                raise _Abort(
                    self._llama_error(
                        'response_format type must be one of "text" or "json_object", but '
                        f"got: {kind}"
                    )
                )
        if "messages" not in body:
            raise _Abort(self._llama_error("'messages' is required"))
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _Abort(self._llama_error("Expected 'messages' to be an array"))
        for message in messages:
            if not isinstance(message, dict) or (
                message.get("role") != "assistant" and "content" not in message
            ):
                raise _Abort(self._llama_error("All non-assistant messages must contain 'content'"))
        return [" ".join(_content_text(m.get("content")) for m in messages)], json_mode

    def _llama_fields(self, req: dict[str, Any]) -> tuple[bool, bool, int | None, int]:
        """server-schema.cpp's fields, in its order: ``stream``, ``include_usage``,
        ``n_predict`` (or ``max_completion_tokens``, ``max_tokens``; -1..INT32_MAX), ``n``
        (1..--parallel). Sampling fields are only type-checked (out-of-range values are
        clamped); fields it does not know (``repetition_penalty``, ``structured_outputs``,
        ``model``) are ignored, and any model name is answered by the one loaded."""
        stream = _llama_field(req, ("stream",), bool)
        opts = req.get("stream_options")
        include_usage = (
            _llama_field(opts, ("include_usage",), bool) if isinstance(opts, dict) else None
        )
        n_predict = _llama_field(
            req, ("n_predict", "max_completion_tokens", "max_tokens"), int, (-1, 2**31 - 1)
        )
        n = _llama_field(req, ("n_cmpl", "n"), int, (1, self.parallel))
        for name in ("top_k", "top_p", "min_p", "temperature", "repeat_penalty", "seed"):
            _llama_field(req, (name,), float)
        return bool(stream), bool(include_usage), n_predict, 1 if n is None else int(n)

    @staticmethod
    def _llama_error(message: str, code: int = 400) -> web.Response:
        return _llama_json_error(message, code)

    def _llama_models_body(self) -> dict[str, Any]:
        name = self.models[0]
        ollama = {"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                  "type": "model", "description": "", "tags": [""],
                  "capabilities": ["completion"], "parameters": "",
                  "details": {"parent_model": "", "format": "gguf", "family": "",
                              "families": [""], "parameter_size": "",
                              "quantization_level": ""}}  # fmt: skip
        meta = dict(_LLAMA_CPP_META)
        meta = {"vocab_type": meta.pop("vocab_type"), "n_vocab": meta.pop("n_vocab"),
                "n_ctx": self.max_model_len, **meta}  # fmt: skip
        card = {"id": name, "aliases": list(self.models), "tags": [], "object": "model",
                "created": self._created, "owned_by": "llamacpp", "meta": meta}  # fmt: skip
        return {"models": [ollama], "object": "list", "data": [card]}

    async def _llama_unary(
        self, request: web.Request, rid: str, gens: list[Generation], chat: bool
    ) -> web.StreamResponse:
        steps = max(len(g.tokens) for g in gens)
        for i in range(steps + 1):
            fault = self._fault(i)
            if fault == "drop":
                self._drop(request)
                raise _Abort(web.Response(status=200))
            if fault == "error":
                raise _Abort(self._llama_error(self._error_message, self._llama_error_code))
            if i < steps:
                await self._pace(i)
        choices: list[dict[str, Any]] = []
        for i, gen in enumerate(gens):
            finish = _llama_finish(gen)
            if chat:
                message = {"role": "assistant", "content": gen.text}
                choices.append({"finish_reason": finish, "index": i, "message": message})
            else:
                choices.append(
                    {"text": gen.text, "index": i, "logprobs": None, "finish_reason": finish}
                )
        # With several results the choices are gathered into the first one's answer, usage
        # and timings included.
        body = {
            "choices": choices,
            "created": int(time.time()),
            "model": self.models[0],
            "system_fingerprint": self.version,
            "object": "chat.completion" if chat else "text_completion",
            "usage": _llama_usage(gens[0]),
            "id": rid,
            "timings": _llama_timings(gens[0]),
        }
        return self._json(body, 200, _LLAMA_CPP_JSON)

    async def _llama_stream(
        self,
        request: web.Request,
        rid: str,
        gens: list[Generation],
        stops: list[str],
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        """Chat: a role chunk ``{"role": "assistant", "content": null}`` with the first
        token, a content chunk per token that has text to send, then a chunk with
        ``finish_reason`` and ``delta: {}``, then (``include_usage``) ``{"choices": [],
        "usage"}``; ``timings`` on the last of these. Completions: a chunk per token (text
        ``""`` for EOS or while a stop string may be starting), then a chunk with ``text:
        ""``, ``finish_reason``, ``usage`` (always) and ``timings``. Then ``data: [DONE]``."""
        model, created = self.models[0], int(time.time())
        pieces = [_llama_pieces(gen, stops) for gen in gens]
        if (
            self._fault(0) == "error"
            and self.error_type in _LLAMA_CPP_ERRORS
            and not self.legacy_errors
        ):
            # An error before the prompt is processed (the checks) is the first result,
            # which is answered as a non-streaming request would be.
            return self._llama_error(self._error_message, self._llama_error_code)
        resp = await self._open_stream(request, dict(_LLAMA_CPP_SSE))

        def chat_chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {"choices": choices, "created": created, "id": rid, "model": model,
                    "system_fingerprint": self.version, "object": "chat.completion.chunk",
                    **extra}  # fmt: skip
            return b"data: " + compact_json(body) + b"\n\n"

        def text_chunk(i: int, text: str, finish: str | None, **extra: Any) -> bytes:
            choice = {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
            body: dict[str, Any] = {"choices": [choice], "created": created, "model": model,
                                    "system_fingerprint": self.version,
                                    "object": "text_completion"}  # fmt: skip
            if "usage" in extra:
                body["usage"] = extra.pop("usage")
            body["id"] = rid
            body.update(extra)
            return b"data: " + compact_json(body) + b"\n\n"

        def final(i: int, gen: Generation) -> bytes:
            finish, timings = _llama_finish(gen), _llama_timings(gen)
            if not chat:
                return text_chunk(i, "", finish, usage=_llama_usage(gen), timings=timings)
            end = [{"finish_reason": finish, "index": i, "delta": {}}]
            if not include_usage:
                return chat_chunk(end, timings=timings)
            usage = chat_chunk([], usage=_llama_usage(gen), timings=timings)
            return chat_chunk(end) + usage

        steps = max(len(g.tokens) for g in gens)
        for step in range(steps + 1):
            fault = self._fault(step)
            if fault == "drop":
                self._drop(request)
                return resp
            if fault == "error":
                await self._write(request, resp, self._llama_stream_error())
                return await self._finish(request, resp)
            if step == steps:
                break
            await self._pace(step)
            out = b""
            for i, gen in enumerate(gens):
                if step >= len(gen.tokens):
                    continue
                last = step == len(gen.tokens) - 1
                piece = pieces[i][step]
                # A stop string is found before the token's result is sent: it has timings.
                extra = {"timings": _llama_timings(gen)} if last and gen.stop_sequence else {}
                if chat:
                    deltas: list[dict[str, Any]] = []
                    if step == 0:
                        deltas.append({"role": "assistant", "content": None})
                    if piece:
                        deltas.append({"content": piece})
                    for k, delta in enumerate(deltas):
                        choice = {"finish_reason": None, "index": i, "delta": delta}
                        out += chat_chunk([choice], **(extra if k == len(deltas) - 1 else {}))
                else:
                    out += text_chunk(i, piece, None, **extra)
                if last:
                    out += final(i, gen)
            if not await self._write(request, resp, out):
                return resp
        if not await self._write(request, resp, b"data: [DONE]\n\n"):
            return resp
        return await self._finish(request, resp)

    @property
    def _llama_error_code(self) -> int:
        return _LLAMA_CPP_ERRORS.get(self.error_type, 500)

    def _llama_stream_error(self) -> bytes:
        """An error after the stream started: ``data: {"error": {...}}`` and the end of
        the body, no ``[DONE]`` (handle_completions_impl's ``format_error``); with
        ``legacy_errors``, the old server.cpp's ``error: {...}`` field, then ``data: [DONE]``."""
        body = llama_cpp_error(self._error_message, self._llama_error_code)
        if self.legacy_errors:
            return b"error: " + compact_json(body["error"]) + b"\n\ndata: [DONE]\n\n"
        return b"data: " + compact_json(body) + b"\n\n"

    # ---------------------------------------------------------------- helpers
    def _stream_error(self) -> bytes:
        """The event for an error inside a started stream, in this flavour's form."""
        if self.flavour == "tgi":
            return b"data:" + compact_json(self._tgi_error_event()) + b"\n\n"
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
    def _json(body: Any, status: int = 200, headers: Mapping[str, str] = _JSON) -> web.Response:
        return web.Response(status=status, body=compact_json(body), headers=dict(headers))


def _type(value: Any) -> str:
    """nlohmann::json's ``type_name()`` of a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _llama_field(
    req: dict[str, Any], names: Sequence[str], kind: type, limits: tuple[int, int] | None = None
) -> Any:
    """One server-schema.cpp field: the first of ``names`` present and not null, read as a
    ``bool`` or a number (nlohmann's ``get<int>`` takes any number or a boolean, and
    truncates); ``limits`` are hard (``Value must be between ...``)."""
    for name in names:
        value = req.get(name)
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool):
            _field_error(name, f"{_TYPE_ERROR} type must be boolean, but is {_type(value)}")
        if kind is not bool and not isinstance(value, int | float):
            _field_error(name, f"{_TYPE_ERROR} type must be number, but is {_type(value)}")
        if kind is int:
            value = int(value)
            if limits is not None and not limits[0] <= value <= limits[1]:
                lo, hi = limits
                _field_error(name, f"Value must be between {lo} <= value <= {hi}, but got {value}")
        return value
    return None


def _field_error(name: str, message: str) -> NoReturn:
    """handle_with_catch: the field's exception as an invalid_argument (400)."""
    raise _Abort(_llama_json_error(f"Field '{name}': {message}"))


def _llama_json_error(message: str, code: int = 400) -> web.Response:
    """An error answer as ex_wrapper and ``res->error`` send it: status = ``code``."""
    body = compact_json(llama_cpp_error(message, code))
    return web.Response(status=code, body=body, headers=dict(_LLAMA_CPP_JSON))


def _llama_finish(gen: Generation) -> str:
    """STOP_TYPE_EOS and STOP_TYPE_WORD are "stop", STOP_TYPE_LIMIT "length"."""
    return "length" if gen.finish == "length" else "stop"


def _llama_usage(gen: Generation) -> dict[str, Any]:
    """usage_json_oaicompat (no prompt cache in the fake: ``cached_tokens`` 0)."""
    prompt, completion = gen.prompt_tokens, gen.completion_tokens
    return {"completion_tokens": completion, "prompt_tokens": prompt,
            "total_tokens": completion + prompt,
            "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def _llama_timings(gen: Generation) -> dict[str, Any]:
    """result_timings::to_json, for a fake that reads 500 prompt tokens/s and writes 50/s."""
    prompt, predicted = gen.prompt_tokens, gen.completion_tokens
    return {"cache_n": 0, "prompt_n": prompt, "prompt_ms": prompt * 2.0,
            "prompt_per_token_ms": 2.0, "prompt_per_second": 500.0,
            "predicted_n": predicted, "predicted_ms": predicted * 20.0,
            "predicted_per_token_ms": 20.0, "predicted_per_second": 50.0}  # fmt: skip


def _llama_pieces(gen: Generation, stops: Sequence[str]) -> list[str]:
    """The text each token sends while streaming (process_token): all the text not sent
    yet, unless it ends with the beginning of a stop string, which holds it back (``""``)
    until a later token decides. The EOS token and the one that completes a stop string
    send what is held; a token that reaches the limit does not, so that text never goes
    out (the whole answer has it)."""
    pieces: list[str] = []
    sent = 0
    for i, token in enumerate(gen.tokens):
        text = gen.texts[i]
        unsent = text[sent:]
        stopped = i == len(gen.tokens) - 1 and gen.stop_sequence is not None
        held = any(
            unsent.endswith(stop[:k])
            for stop in stops
            for k in range(1, min(len(stop), len(unsent)) + 1)
        )
        if stopped or token.special or not held:
            pieces.append(unsent)
            sent = len(text)
        else:
            pieces.append("")
    return pieces


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


def _logprobs(
    req: dict[str, Any], chat: bool, tokens: Sequence[Token], offset: int = 0
) -> dict[str, Any] | None:
    """vLLM's ``logprobs`` of a choice or chunk for ``tokens`` (the EOS token has none):
    chat's ``content`` when ``logprobs`` is true, completions' arrays when it is a number
    (starting at ``offset`` characters into the text); None when not asked for."""
    shown = [t for t in tokens if not t.special]
    if chat:
        if req.get("logprobs") is not True:
            return None
        n = int(req.get("top_logprobs") or 0)

        def entry(t: Token) -> dict[str, Any]:
            return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}

        return {
            "content": [
                {**entry(t), "top_logprobs": [entry(a) for a in alternatives(t, n)]} for t in shown
            ]
        }
    n = req.get("logprobs")
    if not _is_int(n):
        return None
    offsets = [offset + sum(len(t.text) for t in shown[:i]) for i in range(len(shown))]
    return {
        "text_offset": offsets,
        "token_logprobs": [t.logprob for t in shown],
        "tokens": [t.text for t in shown],
        "top_logprobs": [{a.text: a.logprob for a in alternatives(t, n)} for t in shown],
    }
