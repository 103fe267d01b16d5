"""Shared machinery of the fake LLM inference servers (:mod:`.openai`, :mod:`.tgi`, :mod:`.ollama`).

The "model"
-----------
The fakes do not sample: a reply is a fixed list of token strings.

* :meth:`FakeLLMServer.reply_for` gives the tokens for a prompt: ``reply_fn(prompt)`` if a
  test set ``reply_fn``, else ``reply_tokens`` if set, else :data:`JSON_REPLY` when the
  request asked for JSON output (OpenAI ``response_format`` / vLLM ``structured_outputs``
  ``json``, TGI ``grammar`` of type ``json``, Ollama ``format``), else :data:`CANNED_REPLY`
  (``"Hello, I am a fake model."`` in 8 tokens).
* After the reply's tokens the model emits an end-of-sequence token (id :data:`EOS_TOKEN_ID`,
  text :data:`EOS_TEXT`, a *special* token: it counts as a generated token, as it does in
  TGI's ``generated_tokens``, vLLM's ``completion_tokens`` and Ollama's ``eval_count``, but
  its text is never part of the output).
* A "token" of the prompt is a whitespace-separated word: ``prompt_tokens`` is
  ``len(prompt.split())`` (for chat: the message contents joined by a space).
* Token ids and logprobs are deterministic functions of the token text
  (:func:`token_id`, :func:`token_logprob`); the most likely tokens at a position
  (:func:`alternatives`) are the token itself, then invented ones, each less likely.

How generation stops differs per server, so :meth:`FakeLLMServer.generate` takes the two
knobs that differ and each fake documents (and exposes) its own choice:

* ``length_first``: TGI checks ``max_new_tokens`` *before* EOS and stop sequences on every
  token (server/text_generation_server/utils/tokens.py ``StoppingCriteria.__call__``), so a
  limit reached on the EOS token or on a stop-sequence token reports ``length``. vLLM and
  Ollama stop on EOS / stop strings first and only refuse to sample a token past the limit.
* ``stop_mode``: ``"suffix"`` (TGI ``StopSequenceCriteria``: the regex ``{stop}$`` against
  the output so far; the stop sequence *stays in* ``generated_text``) or ``"truncate"``
  (vLLM and Ollama: the first stop string of the list found anywhere in the output; the
  output is cut just before it).

Controls (plain attributes, read by the server thread at each step)
-------------------------------------------------------------------
``delay_s`` (base class: before the response starts), ``first_token_delay_s``,
``token_delay_s`` (also applied to non-streaming requests, which answer after the whole
reply was "generated"), ``disconnect_after_tokens`` (close the TCP connection once N
tokens were written, 0..all of them; the client sees a body that ends without its
terminator -- for N = all tokens, just before the end of the stream),
``error_after_tokens = (n, message)`` (after N tokens send the server's in-stream error;
non-streaming requests get the server's error response instead), ``error_type`` (what kind
of error that is, in TGI's words: ``"generation"`` (default), ``"validation"``,
``"overloaded"``; servers whose errors say so report it, the others ignore it),
``reply_tokens``, ``reply_fn``. They stay set until changed; :meth:`FakeLLMServer.reset`
clears them all. The delays are re-read while a wait is under way: lowering one releases it.

Each fake has ``generation(prompt, ...)`` (the :class:`Generation`, with that server's
stopping rules and defaults) and ``expected_text(prompt, ...)``, so tests can compute the
exact output, token counts and finish reason of a request.

Tool calls
----------
``tool_calls`` scripts them: a list of ``(name, arguments)`` pairs (arguments a dict) that
the model "calls" instead of writing text, when the request offers tools and does not
forbid calling them (``tool_choice`` "none"; a named function narrows the list to it). Each
server sends them in its own format (see each fake); streamed, a call's arguments text
arrives in ``tool_argument_pieces`` pieces (:func:`argument_pieces`). The calls count as
one generated token per piece, plus EOS. The tools and messages a request carried are in
its :class:`~.http_fake.RecordedRequest` (``requests_to(path)[-1].json["tools"]``). Fault
injection (``error_after_tokens``, ``disconnect_after_tokens``) is not modelled for
tool-call answers (Ollama's unary answer still applies it).

A client that goes away mid-stream is counted in ``disconnects`` (and
``last_disconnect_at``) whether aiohttp cancelled the handler while it slept between tokens
or a write failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from .http_fake import SERVER_DROPPED, FakeHTTPServer, stable_seed

#: The default reply, one string per token.
CANNED_REPLY: tuple[str, ...] = ("Hello", ",", " I", " am", " a", " fake", " model", ".")
#: The default reply when the request asked for JSON: ``{"answer": "Hello"}``.
JSON_REPLY: tuple[str, ...] = ('{"', "answer", '":', ' "', "Hello", '"}')
EOS_TOKEN_ID = 2
EOS_TEXT = "</s>"

Finish = Literal["length", "stop", "eos"]
StopMode = Literal["suffix", "truncate"]


def count_tokens(text: str) -> int:
    """The fakes' tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def token_id(text: str) -> int:
    """Deterministic id of a (non-special) token: 3..32002."""
    return 3 + stable_seed("fake-llm-token", text) % 32000


def token_logprob(text: str) -> float:
    """Deterministic logprob of a token; a multiple of 1/8 so it is exact in float32."""
    return -(1 + token_id(text) % 7) / 8


@dataclass(frozen=True)
class Token:
    """One generated token."""

    id: int
    text: str
    logprob: float
    special: bool = False


EOS = Token(EOS_TOKEN_ID, EOS_TEXT, -0.125, special=True)


def alternatives(token: Token, n: int) -> list[Token]:
    """The ``n`` most likely tokens where ``token`` was generated, most likely first: the
    token itself (the fake model is greedy), then its text with 1, 2, ... ``~`` appended,
    each 1 nat less likely (still exact in float32)."""
    texts = [token.text + "~" * k for k in range(1, n)]
    return [token, *(Token(token_id(t), t, token.logprob - k) for k, t in enumerate(texts, 1))][:n]


@dataclass(frozen=True)
class Generation:
    """What the fake model generates for one request (see module docstring)."""

    prompt_tokens: int
    #: Every generated token in order, the EOS token included.
    tokens: tuple[Token, ...]
    #: The output text after each token, as the server reports it so far (stop handling
    #: applied), one entry per token.
    texts: tuple[str, ...]
    finish: Finish
    #: The stop sequence that ended generation (finish == "stop" only).
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        """The final output text."""
        return self.texts[-1] if self.texts else ""

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ScriptedCall:
    """One scripted tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class _Abort(Exception):
    """Stop the handler with a ready response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class FakeLLMServer(FakeHTTPServer):
    """Base class of the LLM fakes: the fake model, pacing and fault injection."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.first_token_delay_s: float = 0.0
        self.token_delay_s: float = 0.0
        self.disconnect_after_tokens: int | None = None
        self.error_after_tokens: tuple[int, str] | None = None
        self.error_type: str = "generation"
        self.reply_tokens: Sequence[str] | None = None
        self.reply_fn: Callable[[str], Sequence[str]] | None = None
        self.tool_calls: Sequence[tuple[str, Mapping[str, Any]]] | None = None
        self.tool_argument_pieces = 3

    # ------------------------------------------------------------------ model
    def calls_for(self, tools: Any, forced: str | None, allowed: bool) -> list[ScriptedCall]:
        """The scripted calls this request gets: none unless it offers ``tools`` and
        ``allowed`` calling them; ``forced`` (a function name) keeps only that tool's."""
        if not self.tool_calls or not tools or not allowed:
            return []
        calls = [ScriptedCall(name, json.dumps(dict(args))) for name, args in self.tool_calls]
        return [c for c in calls if forced is None or c.name == forced]

    def argument_pieces(self, arguments: str) -> list[str]:
        """``arguments`` cut into ``tool_argument_pieces`` pieces (some may be short)."""
        n = max(1, self.tool_argument_pieces)
        size = -(-len(arguments) // n) or 1
        return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]

    def reply_for(self, prompt: str, *, json_mode: bool = False) -> list[str]:
        """The reply tokens (before EOS, stop sequences and limits) for ``prompt``."""
        if self.reply_fn is not None:
            return list(self.reply_fn(prompt))
        if self.reply_tokens is not None:
            return list(self.reply_tokens)
        return list(JSON_REPLY if json_mode else CANNED_REPLY)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int | None,
        stop: Sequence[str] = (),
        json_mode: bool = False,
        length_first: bool = False,
        stop_mode: StopMode = "truncate",
    ) -> Generation:
        """Run the fake model (see the module docstring for the rules)."""
        reply = self.reply_for(prompt, json_mode=json_mode)
        tokens: list[Token] = []
        texts: list[str] = []
        text = ""
        finish: Finish = "length"
        matched: str | None = None
        while True:
            if max_tokens is not None and len(tokens) >= max_tokens:
                finish = "length"
                break
            i = len(tokens)
            if i >= len(reply):
                tokens.append(EOS)
                texts.append(text)
                finish = "length" if length_first and len(tokens) == max_tokens else "eos"
                break
            piece = reply[i]
            tokens.append(Token(token_id(piece), piece, token_logprob(piece)))
            text += piece
            at_limit = length_first and len(tokens) == max_tokens
            if stop_mode == "suffix":
                hit = next((s for s in stop if s and text.endswith(s)), None)
            else:
                hit = next((s for s in stop if s and s in text), None)
                if hit is not None and not at_limit:
                    text = text[: text.index(hit)]
            texts.append(text)
            if at_limit:
                finish = "length"
                break
            if hit is not None:
                finish, matched = "stop", hit
                break
        return Generation(count_tokens(prompt), tuple(tokens), tuple(texts), finish, matched)

    # --------------------------------------------------------------- controls
    def reset(self) -> None:
        """Base reset plus the LLM controls (delays, faults, reply overrides)."""
        super().reset()
        self.first_token_delay_s = 0.0
        self.token_delay_s = 0.0
        self.disconnect_after_tokens = None
        self.error_after_tokens = None
        self.error_type = "generation"
        self.reply_tokens = None
        self.reply_fn = None
        self.tool_calls = None
        self.tool_argument_pieces = 3

    # -------------------------------------------------------------- internals
    async def _pace(self, index: int) -> None:
        """Wait before token ``index`` (0-based) is produced.

        The delay is re-read while waiting (every 10 ms, as ``delay_s`` is), so a test can
        hold a token for as long as it likes and release it by lowering the delay.
        """
        start = time.monotonic()
        while True:
            delay = self.first_token_delay_s if index == 0 else self.token_delay_s
            remaining = delay - (time.monotonic() - start)
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.01))

    def _fault(self, emitted: int) -> Literal["drop", "error"] | None:
        """The fault due once ``emitted`` tokens were written, if any."""
        if self.disconnect_after_tokens is not None and emitted >= self.disconnect_after_tokens:
            return "drop"
        if self.error_after_tokens is not None and emitted >= self.error_after_tokens[0]:
            return "error"
        return None

    @property
    def _error_message(self) -> str:
        return self.error_after_tokens[1] if self.error_after_tokens else ""

    @staticmethod
    def _drop(request: web.Request) -> None:
        """Close the connection under the handler (a server-side abrupt end)."""
        request[SERVER_DROPPED] = True
        if request.transport is not None:
            request.transport.close()

    async def _open_stream(
        self, request: web.Request, headers: dict[str, str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        return resp

    async def _write(self, request: web.Request, resp: web.StreamResponse, data: bytes) -> bool:
        """Write a chunk; False (and the disconnect counted) when the client is gone."""
        try:
            await resp.write(data)
        except ConnectionError:
            if not request.get(SERVER_DROPPED):
                request[SERVER_DROPPED] = True  # do not count the cancellation that follows
                self._record_disconnect()
            return False
        return True

    async def _finish(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        if not request.get(SERVER_DROPPED):
            try:
                await resp.write_eof()
            except ConnectionError:
                request[SERVER_DROPPED] = True
                self._record_disconnect()
        return resp

    async def _read_json(self, request: web.Request) -> Any:
        """The request body parsed as JSON (``None`` when it is not valid JSON)."""
        raw = await request.read()
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            return None


def compact_json(value: Any) -> bytes:
    """JSON as serde_json / pydantic ``model_dump_json`` / starlette write it: no spaces,
    non-ASCII characters as UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def go_json(value: Any) -> bytes:
    """JSON as Go's ``encoding/json`` writes it: compact, UTF-8, with ``<``, ``>``, ``&``,
    U+2028 and U+2029 escaped (``json.Marshal`` escapes HTML by default). These characters
    only ever occur inside strings, so replacing them in the output is safe."""
    out = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        out = out.replace(ch, esc)
    return out.encode()


def go_time(ns: int | None = None) -> str:
    """A Go ``time.Time`` in UTC as ``encoding/json`` writes it (RFC 3339, nanoseconds with
    trailing zeros trimmed), e.g. ``2024-05-01T10:20:30.123456789Z``."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{base}.{frac:09d}".rstrip("0").rstrip(".") + "Z"
