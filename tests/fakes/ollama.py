"""Fake Ollama HTTP server: embeddings (``/api/embed``) and generation (``/api/chat``,
``/api/generate``).

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

Generation (``/api/chat``, ``/api/generate``; the model is :mod:`.llm`'s):

* ``server/routes.go`` ``ChatHandler`` / ``GenerateHandler``: an unknown model -> 404
  ``{"error": "model '<name>' not found"}`` (``GetModel`` fails before any scheduling; the
  name as the request spelled it); an embedding-only model -> 400 ``{"error": "\"<name>\"
  does not support chat"}`` (``generate`` for /api/generate; ``errCapabilityCompletion``);
  no messages (chat) / empty prompt (generate) -> 200 ``done_reason`` ``load``, or
  ``unload`` with ``keep_alive: 0``; ``raw`` with ``template``/``system``/``context`` -> 400
  "raw mode does not support template, system, or context". The final response carries
  ``done_reason``, ``total_duration``, ``load_duration`` and the runner's metrics;
  ``stream: false`` answers the last response with the whole content
  (``Content-Type: application/json; charset=utf-8``).
* ``server/routes.go`` ``streamResponse``: ``Content-Type: application/x-ndjson``, one
  ``json.Marshal`` value plus ``\n`` per response; an error *before anything was written*
  becomes the HTTP status (500 unless the runner gave one) with ``{"error": ...}``; an error
  after content is one more line ``{"error": "..."}`` (``json.NewEncoder(...).Encode``) and
  the stream ends, status 200 already sent.
* ``api/types.go``: ``ChatRequest`` (``model``, ``messages``, ``stream`` (``*bool``, default
  true), ``format`` (``"json"`` or a JSON-schema object), ``keep_alive``, ``options``),
  ``GenerateRequest`` (+ ``prompt``, ``system``, ``template``, ``context``, ``raw``,
  ``suffix``); ``ChatResponse`` field order ``model, created_at, message {role, content},
  done_reason (omitempty), done`` + ``Metrics`` (``total_duration, load_duration,
  prompt_eval_count, prompt_eval_duration, eval_count, eval_duration``, all omitempty, in
  ns); ``GenerateResponse`` ``model, created_at, response, done, done_reason, context`` (not
  for ``raw``) + ``Metrics``; ``Options.FromMap`` type errors ("option %q must be of type
  float32" / "integer" / "array" / "must be of an array of strings"; answered 500 by
  ``handleScheduleError``); options ``temperature, top_p, top_k, repeat_penalty, seed,
  num_predict, stop, num_ctx``.
* ``llm/server.go`` ``Completion``: ``format`` other than ``""``/``null``/``"json"``/an
  object -> ``invalid format: %q; expected "json" or a valid JSON Schema object`` (%q of
  the raw JSON), a plain error, so 500.
* ``runner/llamarunner/runner.go``: ``numDecoded`` is counted before the EOS check (the EOS
  token counts in ``eval_count``, its text is never sent); ``num_predict > 0`` caps the
  tokens (``done_reason`` ``length``); stop strings (``common.FindStop``: the first of the
  list found in the pending text) cut the text before the stop, ``done_reason`` ``stop``;
  pending text whose end could begin a stop string is held back
  (``ContainsStopSuffix``) and flushed together later; content chunks never carry
  ``done``, the final ``done: true`` response has empty content.
* ``llm.DoneReason`` strings: ``stop``, ``length``; timestamps are Go ``time.Time`` in UTC
  (RFC 3339 with nanoseconds); Go's ``json.Marshal`` escapes ``<``, ``>``, ``&``.

Chat models are a separate list (``chat_models``, default ``llama3.2:latest``); ``/api/tags``
lists the embedding models, then the chat models.

Tool calls (``tool_calls`` scripted, see :mod:`.llm`; ``docs/api.md`` "Chat request (with
tools)", ``api/types.go`` ``ToolCall``): ``/api/chat`` with ``tools`` answers with
``message: {"role": "assistant", "content": "", "tool_calls": [{"function": {"name",
"arguments": {...}}}]}`` (the arguments an *object*, no id), ``done_reason`` ``stop``;
streamed, each call arrives whole in a chunk of its own (``done: false``) before the final
``done`` chunk. Messages sent back must carry their ``tool_calls`` arguments as objects: a
string is Go's 400 unmarshal error. A tool result is ``role: tool`` with ``tool_name``.

Simplifications: a "token" is a whitespace-separated word; the embedding context length is
``min(num_ctx, options.num_ctx)`` (chat prompts are not truncated to it); no chat template
is applied (the prompt is the message contents joined by a space); thinking, images and
logprobs are not modelled, nor Ollama's refusal of tools for a model whose template has
none; Go's JSON decode error texts are approximated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from aiohttp import web

from .http_fake import f32_wire, stable_seed
from .llm import FakeLLMServer, Generation, ScriptedCall, _Abort, go_json, go_time, token_id

INPUT_TOO_LONG = "the input length exceeds the context length"
_MODIFIED_AT = "2025-01-15T10:20:30.123456789Z"  # time.Time, RFC 3339 with nanoseconds


def canonical_model_name(name: str) -> str:
    """``all-minilm`` -> ``all-minilm:latest`` (the tag defaults to ``latest``)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def model_not_found(name: str) -> str:
    """The 404 message; ``json.dumps`` quotes like Go's ``%q`` for plain names."""
    return f"model {json.dumps(name, ensure_ascii=False)} not found, try pulling it first"


class FakeOllama(FakeLLMServer):
    """In-process stand-in for an Ollama server's embedding and generation APIs (see module
    docstring). ``models``: embedding models (name -> dimensions); ``chat_models``: the
    models ``/api/chat`` and ``/api/generate`` serve."""

    inference_paths: ClassVar[frozenset[str]] = frozenset(
        {"/api/embed", "/api/chat", "/api/generate"}
    )

    def __init__(
        self,
        *,
        models: Mapping[str, int] | None = None,
        chat_models: Sequence[str] | None = None,
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
        #: canonical names of the generation models
        self.chat_models: list[str] = [
            canonical_model_name(m) for m in (("llama3.2",) if chat_models is None else chat_models)
        ]
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
            + [
                {
                    "name": name,
                    "model": name,
                    "modified_at": _MODIFIED_AT,
                    "size": 2_019_393_189,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "llama",
                        "families": ["llama"],
                        "parameter_size": "3.2B",
                        "quantization_level": "Q4_K_M",
                    },
                }
                for name in self.chat_models
            ]
        }

    # ---------------------------------------------------------------- routing
    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._root)  # also answers HEAD
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/generate", self._generate)

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
        chat = self._resolve_chat(name)
        if chat is not None:
            return web.json_response(
                {
                    "modelfile": f"FROM {chat}\n",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "details": self.tags()["models"][-1]["details"],
                    "model_info": {"general.architecture": "llama", "llama.context_length": 4096},
                    "capabilities": ["completion"],
                    "modified_at": _MODIFIED_AT,
                }
            )
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

    # ------------------------------------------------------------- generation
    def generation(
        self,
        prompt: str,
        *,
        num_predict: int | None = None,
        stop: Sequence[str] = (),
        json_mode: bool = False,
    ) -> Generation:
        """What a chat/generate request with this prompt produces (Ollama's stop rules). For
        chat the prompt is the message contents joined by a space; ``num_predict`` <= 0 or
        None means no limit, as in the runner."""
        limit = num_predict if num_predict is not None and num_predict > 0 else None
        return self.generate(prompt, max_tokens=limit, stop=list(stop), json_mode=json_mode)

    def expected_text(self, prompt: str, **kwargs: Any) -> str:
        """The content a request with this prompt gets back (see :meth:`generation`)."""
        return self.generation(prompt, **kwargs).text

    def _resolve_chat(self, name: str) -> str | None:
        canonical = canonical_model_name(name).lower() if name else ""
        return next((m for m in self.chat_models if m.lower() == canonical), None)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._complete(request, chat=True)
        except _Abort as abort:
            return abort.response

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._complete(request, chat=False)
        except _Abort as abort:
            return abort.response

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        start = time.monotonic_ns()
        raw = await request.read()
        if not raw.strip():
            raise _Abort(_go_error(400, "missing request body"))
        try:
            req = json.loads(raw)
        except ValueError as exc:
            raise _Abort(_go_error(400, str(exc))) from None
        struct = "ChatRequest" if chat else "GenerateRequest"
        if not isinstance(req, dict):
            raise _Abort(
                _go_error(400, f"json: cannot unmarshal into Go value of type api.{struct}")
            )
        model = req.get("model")
        if not isinstance(model, str) or not model:
            if model is not None and not isinstance(model, str):
                raise _Abort(_go_error(400, _unmarshal(model, struct, "model", "string")))
            raise _Abort(_go_error(400, "model is required"))
        if self._resolve_chat(model) is None:
            if self._resolve(model) is not None:
                verb = "chat" if chat else "generate"
                raise _Abort(_go_error(400, f"{json.dumps(model)} does not support {verb}"))
            raise _Abort(_go_error(404, f"model '{model}' not found"))
        keep_alive = req.get("keep_alive")
        if chat:
            messages = req.get("messages") or []
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise _Abort(
                    _go_error(400, _unmarshal(messages, struct, "messages", "[]api.Message"))
                )
            _check_tool_calls(messages)
            prompt = " ".join(str(m.get("content") or "") for m in messages)
            idle = not messages
        else:
            prompt = req.get("prompt") or ""
            if not isinstance(prompt, str):
                raise _Abort(_go_error(400, _unmarshal(prompt, struct, "prompt", "string")))
            if req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
                raise _Abort(
                    _go_error(400, "raw mode does not support template, system, or context")
                )
            if req.get("system"):
                prompt = f"{req['system']} {prompt}"
            idle = not req.get("prompt")
        if idle:  # load (or, with keep_alive 0, unload) the model; nothing is generated
            reason = "unload" if keep_alive in (0, "0", "0s") else "load"
            body: dict[str, Any] = {"model": model, "created_at": go_time()}
            if chat:
                body["message"] = {"role": "assistant", "content": ""}
                body["done_reason"], body["done"] = reason, True
            else:
                body["response"], body["done"], body["done_reason"] = "", True, reason
            return _go_response(body)
        options = req.get("options") or {}
        if not isinstance(options, dict):
            raise _Abort(
                _go_error(400, _unmarshal(options, struct, "options", "map[string]interface {}"))
            )
        _check_options(options)
        json_mode = _check_format(req.get("format"))
        loaded = time.monotonic_ns()
        await self._simulate_latency()
        stops = options.get("stop") or []
        num_predict = options.get("num_predict")
        gen = self.generation(
            prompt,
            num_predict=int(num_predict) if num_predict is not None else None,
            stop=stops,
            json_mode=json_mode,
        )
        pieces = _pieces(gen, stops)
        raw_mode = bool(req.get("raw"))
        calls = self.calls_for(req.get("tools"), None, allowed=True) if chat else []
        # Calls replace the text: one token per piece of their arguments, plus EOS.
        eval_count = (
            sum(len(self.argument_pieces(c.arguments)) for c in calls) + 1
            if calls
            else gen.completion_tokens
        )

        def response(content: str, done: bool) -> dict[str, Any]:
            body: dict[str, Any] = {"model": model, "created_at": go_time()}
            if chat:
                body["message"] = {"role": "assistant", "content": content}
                if calls and done and req.get("stream") is False:
                    body["message"]["tool_calls"] = [_tool_call(c) for c in calls]
                if done:
                    finish = "length" if gen.finish == "length" and not calls else "stop"
                    body["done_reason"] = finish
                body["done"] = done
            else:
                body["response"] = content
                body["done"] = done
                if done:
                    body["done_reason"] = "length" if gen.finish == "length" else "stop"
                    if not raw_mode:
                        body["context"] = [token_id(w) for w in f"{prompt} {gen.text}".split()]
            if done:
                now = time.monotonic_ns()
                body["total_duration"] = max(now - start, 1)
                body["load_duration"] = max(loaded - start, 1)
                body["prompt_eval_count"] = gen.prompt_tokens
                body["prompt_eval_duration"] = max((now - loaded) // 4, 1)
                body["eval_count"] = eval_count
                body["eval_duration"] = max((now - loaded) // 2, 1)
            return body

        if req.get("stream") is False:
            for i in range(len(gen.tokens) + 1):
                fault = self._fault(i)
                if fault == "drop":
                    self._drop(request)
                    raise _Abort(web.Response(status=200))
                if fault == "error":
                    raise _Abort(_go_error(500, self._error_message))
                if i < len(gen.tokens):
                    await self._pace(i)
            return _go_response(response("" if calls else gen.text, True))

        # gin sends the status and headers with the first chunk, not before.
        resp: web.StreamResponse | None = None
        if calls:
            resp = await self._open_stream(request, {"Content-Type": "application/x-ndjson"})
            for i, call in enumerate(calls):
                await self._pace(i)
                chunk = response("", False)
                chunk["message"]["tool_calls"] = [_tool_call(call)]
                if not await self._write(request, resp, go_json(chunk) + b"\n"):
                    return resp
            if not await self._write(request, resp, go_json(response("", True)) + b"\n"):
                return resp
            return await self._finish(request, resp)
        for step in range(len(gen.tokens) + 1):
            fault = self._fault(step)
            if fault == "drop":
                self._drop(request)
                return resp or web.Response(status=200)
            if fault == "error":
                if resp is None:  # nothing written yet: a plain error response
                    return _go_error(500, self._error_message)
                line = go_json({"error": self._error_message}) + b"\n"
                await self._write(request, resp, line)
                return await self._finish(request, resp)
            if step == len(gen.tokens):
                break
            await self._pace(step)
            out = b""
            if pieces[step]:
                out += go_json(response(pieces[step] or "", False)) + b"\n"
            if step == len(gen.tokens) - 1:
                out += go_json(response("", True)) + b"\n"
            if not out:
                continue
            if resp is None:
                resp = await self._open_stream(request, {"Content-Type": "application/x-ndjson"})
            if not await self._write(request, resp, out):
                return resp
        assert resp is not None
        return await self._finish(request, resp)


def _tool_call(call: ScriptedCall) -> dict[str, Any]:
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


def _check_tool_calls(messages: list[dict[str, Any]]) -> None:
    """api.ToolCallFunctionArguments is a map: arguments sent as JSON text fail to unmarshal."""
    for message in messages:
        for call in message.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments")
            if arguments is not None and not isinstance(arguments, dict):
                raise _Abort(
                    _go_error(
                        400,
                        _unmarshal(
                            arguments,
                            "ChatRequest",
                            "messages.tool_calls.function.arguments",
                            "api.ToolCallFunctionArguments",
                        ),
                    )
                )


def _pieces(gen: Generation, stops: Sequence[str]) -> list[str | None]:
    """The content chunk sent after each generated token (None: nothing sent then).

    The runner keeps unsent pieces pending while their end could be the start of a stop
    string (``ContainsStopSuffix``) and flushes them together; at the end (EOS, limit or
    stop) the rest of the text goes out before the final ``done`` response."""
    out: list[str | None] = []
    sent = ""
    for i in range(len(gen.tokens)):
        if i == len(gen.tokens) - 1:
            out.append(gen.text[len(sent) :] or None)
            break
        pending = gen.texts[i][len(sent) :]
        if any(pending.endswith(s[:k]) for s in stops for k in range(1, len(s) + 1)):
            out.append(None)
            continue
        out.append(pending or None)
        sent = gen.texts[i]
    return out


def _check_options(options: dict[str, Any]) -> None:
    """``api.Options.FromMap`` type checks for the options the fake reads."""
    kinds = {
        "temperature": "float32",
        "top_p": "float32",
        "repeat_penalty": "float32",
        "top_k": "integer",
        "seed": "integer",
        "num_predict": "integer",
        "num_ctx": "integer",
    }
    for key, kind in kinds.items():
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _Abort(_go_error(500, f"option {json.dumps(key)} must be of type {kind}"))
    stop = options.get("stop")
    if stop is not None:
        if not isinstance(stop, list):
            raise _Abort(_go_error(500, 'option "stop" must be of type array'))
        if not all(isinstance(s, str) for s in stop):
            raise _Abort(_go_error(500, 'option "stop" must be of an array of strings'))


def _check_format(fmt: Any) -> bool:
    """``llm/server.go``: the ``format`` field; True when it asks for JSON."""
    if fmt is None or fmt == "":
        return False
    if fmt == "json" or isinstance(fmt, dict):
        return True
    raw = go_json(fmt).decode()
    message = f'invalid format: {json.dumps(raw)}; expected "json" or a valid JSON Schema object'
    raise _Abort(_go_error(500, message))


def _unmarshal(value: Any, struct: str, field: str, go_type: str) -> str:
    kind = {bool: "bool", str: "string", list: "array", dict: "object"}.get(type(value), "number")
    return f"json: cannot unmarshal {kind} into Go struct field {struct}.{field} of type {go_type}"


def _go_response(body: dict[str, Any], status: int = 200) -> web.Response:
    """gin ``c.JSON``: ``encoding/json`` body, ``application/json; charset=utf-8``."""
    return web.Response(
        status=status,
        body=go_json(body),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


def _go_error(status: int, message: str) -> web.Response:
    return _go_response({"error": message}, status)


def _normalize(vec: Any) -> Any:
    """server/routes.go ``normalize``: v / max(||v||, 1e-12) in float32."""
    norm = max(float(np.sqrt(np.sum(vec.astype(np.float64) ** 2))), 1e-12)
    return (vec / norm).astype(np.float32)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
