"""The fake OpenAI-compatible server's llama.cpp flavour against the real llama-server (the
`llm_server` fixture: Gemma 3 270M, two slots of 1024 tokens): the same requests to both,
and what comes back compared by shape (the keys of answers and chunks, the order of the
kinds of chunk, finish reasons, where usage and timings ride, error statuses and bodies),
never by the text the model writes. Kept small: a few tokens per request on two CPU cores.

The real server is greedy (`temperature` 0) and told to `ignore_eos` (a llama.cpp field the
fake ignores, as it ignores any field it does not know), so that `max_tokens` is what ends
it; where it must end on EOS, a `logit_bias` forces the EOS token and the fake is given an
empty reply. An error inside a stream that already answered 200 cannot be provoked from
outside the real server; the last tests pin the fake's against llama.cpp's source."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from daert.local.llm import MODEL_NAME, EmbeddedLlm

from tests.fakes.openai import LLAMA_CPP_BUILD, FakeOpenAI

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
PROMPT = "The capital of France is"
# Greedy, and only max_tokens ends it.
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True, "cache_prompt": False}
# Gemma's <eos> (token 1) at once.
EOS_NOW: dict[str, Any] = {"logit_bias": {"1": 100}}
# More tokens than a slot holds, for both tokenizers (the fake's is one token per word).
LONG = " ".join(["word"] * 1100)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    # The fixture's llama-server: --ctx-size 2048 --parallel 2, so a slot has 1024 tokens.
    with FakeOpenAI(
        models=[MODEL_NAME], flavour="llama.cpp", max_model_len=1024, parallel=2
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(fake: FakeOpenAI) -> None:
    fake.reset()


@pytest.fixture
def urls(llm_server: EmbeddedLlm, fake: FakeOpenAI) -> dict[str, str]:
    return {"real": llm_server.url, "fake": fake.url}


def post(url: str, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return httpx.post(url + path, content=content, headers=headers, timeout=120)


def both(urls: dict[str, str], path: str, body: Any) -> dict[str, httpx.Response]:
    return {name: post(url, path, body) for name, url in urls.items()}


def shape(value: Any) -> Any:
    """The structure of a JSON value: objects as their keys (in order) with the shapes of
    their values, arrays as the shapes of their items, scalars as a type name."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    if value is None or isinstance(value, bool | str):
        return type(value).__name__
    return "number"


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The chunks of an SSE answer, checked for llama.cpp's framing: single-line `data: `
    events, each ended by a blank line, the last one `[DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    text = response.text
    assert text.endswith("\n\n")
    payloads = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event.removeprefix("data: "))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def kinds(chunks: list[dict[str, Any]]) -> list[Any]:
    """The chunks' shapes, runs of the same shape counted once (how many tokens there were
    is the model's business)."""
    out: list[Any] = []
    for chunk in chunks:
        if not out or out[-1] != shape(chunk):
            out.append(shape(chunk))
    return out


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]


def assert_same_answer(replies: dict[str, httpx.Response]) -> dict[str, dict[str, Any]]:
    real, fake = replies["real"], replies["fake"]
    assert real.status_code == fake.status_code == 200, (real.text, fake.text)
    assert real.headers["content-type"] == fake.headers["content-type"]
    bodies = {name: r.json() for name, r in replies.items()}
    assert shape(bodies["real"]) == shape(bodies["fake"])
    for body in bodies.values():
        assert body["id"].startswith("chatcmpl-") and len(body["id"]) == len("chatcmpl-") + 32
        assert body["model"] == MODEL_NAME
        assert body["system_fingerprint"] == LLAMA_CPP_BUILD
    return bodies


def assert_same_stream(replies: dict[str, httpx.Response]) -> dict[str, list[dict[str, Any]]]:
    chunks = {name: events(r) for name, r in replies.items()}
    assert kinds(chunks["real"]) == kinds(chunks["fake"])
    for stream in chunks.values():
        assert len({c["id"] for c in stream}) == 1
        # timings ride on the last chunk (and on a stop string's token, which these lack).
        assert [i for i, c in enumerate(stream) if "timings" in c] == [len(stream) - 1]
    return chunks


# --- routes ----------------------------------------------------------------------------------


def test_health_models_and_an_unknown_route(urls: dict[str, str]) -> None:
    replies = {name: httpx.get(url + "/health") for name, url in urls.items()}
    assert {r.status_code for r in replies.values()} == {200}
    assert replies["real"].json() == replies["fake"].json() == {"status": "ok"}
    assert replies["real"].headers["content-type"] == replies["fake"].headers["content-type"]
    for path in ("/v1/models", "/models"):
        models = {name: httpx.get(url + path).json() for name, url in urls.items()}
        assert shape(models["real"]) == shape(models["fake"])
        for body in models.values():
            (card,) = body["data"]
            assert (card["id"], card["aliases"], card["owned_by"]) == (
                MODEL_NAME,
                [MODEL_NAME],
                "llamacpp",
            )
            assert card["meta"]["n_ctx"] == 1024
    for method, path in (("GET", "/version"), ("GET", CHAT), ("POST", "/v1/nothing")):
        missing = {name: httpx.request(method, url + path) for name, url in urls.items()}
        assert missing["real"].status_code == missing["fake"].status_code == 404
        assert missing["real"].json() == missing["fake"].json()


# --- answers ---------------------------------------------------------------------------------


def test_chat_and_completion_answers(urls: dict[str, str]) -> None:
    chat = assert_same_answer(both(urls, CHAT, {"messages": MESSAGES, "max_tokens": 3, **GREEDY}))
    text = assert_same_answer(
        both(urls, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 3, **GREEDY})
    )
    for body in (*chat.values(), *text.values()):
        (choice,) = body["choices"]
        assert choice["finish_reason"] == "length"
        assert "stop_reason" not in choice
        assert body["usage"]["completion_tokens"] == 3
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert {b["object"] for b in chat.values()} == {"chat.completion"}
    assert {b["object"] for b in text.values()} == {"text_completion"}


def test_eos_is_stop(urls: dict[str, str], fake: FakeOpenAI) -> None:
    fake.reply_tokens = []  # EOS at once, as the logit bias makes the real model do
    bodies = assert_same_answer(
        both(urls, CHAT, {"messages": MESSAGES, "max_tokens": 3, **EOS_NOW})
    )
    for body in bodies.values():
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": ""}
        assert body["usage"]["completion_tokens"] == 1  # the EOS token counts
    chunks = assert_same_stream(
        both(urls, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 3, "stream": True, **EOS_NOW})
    )
    for stream in chunks.values():
        # The EOS token's chunk (no text), then the final one.
        assert [c["choices"][0]["text"] for c in stream] == ["", ""]
        assert finish_reasons(stream) == ["stop"]
    chunks = assert_same_stream(
        both(urls, CHAT, {"messages": MESSAGES, "max_tokens": 3, "stream": True, **EOS_NOW})
    )
    for stream in chunks.values():
        # The role chunk, then the finish: EOS has no text to send.
        assert [c["choices"][0]["delta"] for c in stream] == [
            {"role": "assistant", "content": None},
            {},
        ]


# --- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream(urls: dict[str, str], include_usage: bool) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, **GREEDY}
    body["stream_options"] = {"include_usage": include_usage}
    chunks = assert_same_stream(both(urls, CHAT, body))
    for stream in chunks.values():
        first, *tokens, end = stream[: -1 if include_usage else None]
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert len(tokens) == 3
        assert all(set(c["choices"][0]["delta"]) == {"content"} for c in tokens)
        assert end["choices"][0]["delta"] == {}
        assert finish_reasons(stream) == ["length"]
        with_usage = [c for c in stream if "usage" in c]
        if include_usage:
            assert with_usage == [stream[-1]] and stream[-1]["choices"] == []
            assert stream[-1]["usage"]["completion_tokens"] == 3
        else:
            assert with_usage == []


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream(urls: dict[str, str], include_usage: bool) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, **GREEDY}
    body["stream_options"] = {"include_usage": include_usage}
    chunks = assert_same_stream(both(urls, COMPLETIONS, body))
    for stream in chunks.values():
        assert len(stream) == 3 + 1
        assert stream[-1]["choices"][0]["text"] == ""
        assert finish_reasons(stream) == ["length"]
        # usage rides on the final chunk, whatever include_usage says.
        assert [c for c in stream if "usage" in c] == [stream[-1]]
        assert stream[-1]["usage"]["completion_tokens"] == 3


def test_stop_string_is_stop_without_a_stop_reason(urls: dict[str, str]) -> None:
    # The third token of each server's own reply is the stop string, so the answers are
    # the first two tokens, and the streams hold the same kinds of chunk.
    learn = {"prompt": PROMPT, "max_tokens": 3, "stream": True, **GREEDY}
    pieces = {
        name: [c["choices"][0]["text"] for c in events(post(url, COMPLETIONS, learn))][:3]
        for name, url in urls.items()
    }
    for name, url in urls.items():
        first, second, stop = pieces[name]
        assert stop and stop not in first + second, pieces
        body = {"prompt": PROMPT, "max_tokens": 8, "stop": [stop], **GREEDY}
        answer = post(url, COMPLETIONS, body).json()
        (choice,) = answer["choices"]
        assert (choice["text"], choice["finish_reason"]) == (first + second, "stop")
        assert "stop_reason" not in choice
        stream = events(post(url, COMPLETIONS, {**body, "stream": True}))
        assert [c["choices"][0]["text"] for c in stream] == [first, second, "", ""]
        assert finish_reasons(stream) == ["stop"]
        # The stop string's token is found before its chunk goes out: it has timings too.
        assert [i for i, c in enumerate(stream) if "timings" in c] == [2, 3]
        assert "usage" in stream[-1]


# --- errors ----------------------------------------------------------------------------------

M = {"messages": MESSAGES, "max_tokens": 1}
#: (path, body, status, type, same message on both)
ERRORS = {
    "max_tokens-a-string": (CHAT, {**M, "max_tokens": "abc"}, 400, "invalid_request_error", True),
    "temperature-a-string": (CHAT, {**M, "temperature": "hot"}, 400, "invalid_request_error", True),
    "stream-a-string": (CHAT, {**M, "stream": "yes"}, 400, "invalid_request_error", True),
    "max_tokens-negative": (
        COMPLETIONS, {"prompt": PROMPT, "max_tokens": -5}, 400, "invalid_request_error", True,
    ),
    "n-above-the-slots": (CHAT, {**M, "n": 3}, 400, "invalid_request_error", True),
    "unknown-response_format": (
        CHAT, {**M, "response_format": {"type": "nope"}}, 400, "invalid_request_error", True,
    ),
    "unknown-response_format-stream": (
        CHAT, {**M, "response_format": {"type": "nope"}, "stream": True}, 400,
        "invalid_request_error", True,
    ),
    "no-messages": (CHAT, {"max_tokens": 1}, 400, "invalid_request_error", True),
    "messages-not-a-list": (CHAT, {"messages": "hi"}, 400, "invalid_request_error", True),
    "no-prompt": (COMPLETIONS, {"max_tokens": 1}, 400, "invalid_request_error", True),
    "not-json": (CHAT, b"{not json", 500, "server_error", False),
    "prompt-too-long": (
        CHAT, {"messages": [{"role": "user", "content": LONG}], "max_tokens": 1}, 400,
        "exceed_context_size_error", False,
    ),
    "prompt-too-long-stream": (
        CHAT, {"messages": [{"role": "user", "content": LONG}], "stream": True}, 400,
        "exceed_context_size_error", False,
    ),
    "completion-prompt-too-long-stream": (
        COMPLETIONS, {"prompt": LONG, "stream": True}, 400, "exceed_context_size_error", False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(urls: dict[str, str], case: str) -> None:
    path, body, status, kind, same_message = ERRORS[case]
    replies = both(urls, path, body)
    real, fake = replies["real"], replies["fake"]
    assert real.status_code == fake.status_code == status, (real.text, fake.text)
    assert real.headers["content-type"] == fake.headers["content-type"]
    errors = {name: r.json() for name, r in replies.items()}
    assert shape(errors["real"]) == shape(errors["fake"])
    for error in errors.values():
        assert (error["error"]["code"], error["error"]["type"]) == (status, kind)
    if same_message:
        assert errors["real"] == errors["fake"]
    if kind == "exceed_context_size_error":
        for error in errors.values():
            details = error["error"]
            assert details["n_ctx"] == 1024 and details["n_prompt_tokens"] > 1024
            assert re.fullmatch(
                r"request \(\d+ tokens\) exceeds the available context size \(1024 tokens\), "
                r"try increasing it",
                details["message"],
            )


ACCEPTED = {
    "unknown-model": {**M, "model": "no-such-model"},
    "stream_options-without-stream": {**M, "stream_options": {"include_usage": True}},
    "json_schema-without-schema": {**M, "response_format": {"type": "json_schema"}},
    "vllm-only-fields": {**M, "repetition_penalty": 1.1, "structured_outputs": {"regex": "a"}},
    "out-of-range-sampling": {**M, "temperature": -1, "top_p": 2, "top_k": -1},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_what_vllm_refuses_llama_cpp_answers(urls: dict[str, str], case: str) -> None:
    assert_same_answer(both(urls, CHAT, ACCEPTED[case]))


def test_max_tokens_past_the_context_ends_at_the_context(
    urls: dict[str, str], fake: FakeOpenAI
) -> None:
    # 1015 words: 1016 tokens with the real server's BOS, 1015 for the fake's tokenizer.
    fake.reply_tokens = [" word"] * 20
    body = {"prompt": " ".join(["word"] * 1015), "max_tokens": 50, **GREEDY}
    bodies = assert_same_answer(both(urls, COMPLETIONS, body))
    for body in bodies.values():
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["total_tokens"] == 1024  # the slot is full, not max_tokens
        assert body["usage"]["completion_tokens"] < 50


# --- errors inside a stream (the fake only) --------------------------------------------------


def test_an_error_inside_a_stream_ends_it_without_done(fake: FakeOpenAI) -> None:
    """handle_completions_impl: a later result that is an error is sent as
    `format_oai_sse({"error": ...})` and the stream ends there (`return false`), no [DONE]."""
    fake.error_after_tokens, fake.error_type = (2, "Compute error."), "generation"
    chunks = post(fake.url, CHAT, {"messages": MESSAGES, "stream": True}).text.split("\n\n")
    assert chunks[-2:] == [
        'data: {"error":{"code":500,"message":"Compute error.","type":"server_error"}}',
        "",
    ]
    assert [json.loads(c[6:])["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": None},
        {"content": "Hello"},
        {"content": ","},
    ]
    # Before the first result (the request's checks), an error is answered with its status.
    fake.error_after_tokens, fake.error_type = (0, "Prompt contains invalid tokens"), "validation"
    reply = post(fake.url, CHAT, {"messages": MESSAGES, "stream": True})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_legacy_errors_are_an_error_field() -> None:
    """The old server.cpp: server_sent_event(sink, "error", error_data), then [DONE]."""
    with FakeOpenAI(models=[MODEL_NAME], flavour="llama.cpp", legacy_errors=True) as old:
        old.error_after_tokens, old.error_type = (0, "context full"), "validation"
        text = post(old.url, CHAT, {"messages": MESSAGES, "stream": True}).text
    assert text == (
        'error: {"code":400,"message":"context full","type":"invalid_request_error"}\n\n'
        "data: [DONE]\n\n"
    )
