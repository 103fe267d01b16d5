"""Tests of the fake LLM inference servers (vLLM/OpenAI, TGI, Ollama chat)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from . import CANNED_REPLY, FakeOpenAI

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
PROMPT = "be brief hi there"  # the chat prompt as the fakes see it: contents joined by a space


def sse_data(body: str) -> list[str]:
    """The ``data`` payloads of an SSE body, in order (either ``data:`` framing)."""
    out = []
    for line in body.split("\n"):
        if line.startswith("data:"):
            out.append(line[5:].removeprefix(" "))
    return out


def read_stream(url: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", url, json=body, **kwargs) as r:
        text = r.read().decode()
    return r, text


def stream_until_broken(url: str, body: dict[str, Any]) -> list[str]:
    """Read an SSE/NDJSON stream the server drops; the lines received before the break."""
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
    return lines


# ----------------------------------------------------------------------- OpenAI / vLLM


@pytest.fixture
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["base-model", "alias"], max_model_len=64, enable_lora=True) as fake:
        yield fake


def chat(fake: FakeOpenAI, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{fake.url}/v1/chat/completions",
        json={"model": "base-model", "messages": MESSAGES, **body},
    )


def test_vllm_chat_unary(vllm: FakeOpenAI) -> None:
    r = chat(vllm)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "base-model"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "".join(CANNED_REPLY) == vllm.expected_text(PROMPT)
    assert choice["message"]["tool_calls"] == []
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
    # 8 reply tokens + EOS; the prompt is 4 words
    assert body["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 13,
        "completion_tokens": 9,
        "prompt_tokens_details": None,
    }
    # an alias of the base model answers with the first served name
    assert chat(vllm, model="alias").json()["model"] == "base-model"
    assert chat(vllm, model=None).json()["model"] == "base-model"


def test_vllm_chat_limits_and_stop(vllm: FakeOpenAI) -> None:
    body = chat(vllm, max_tokens=3).json()
    assert body["choices"][0]["message"]["content"] == "Hello, I"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    body = chat(vllm, max_completion_tokens=2, max_tokens=5).json()
    assert body["usage"]["completion_tokens"] == 2
    body = chat(vllm, stop=["am", " fake"]).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello, I " == vllm.expected_text(PROMPT, stop="am")
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "am")
    assert body["usage"]["completion_tokens"] == 4
    gen = vllm.generation(PROMPT, stop=["am", " fake"])
    assert (gen.finish, gen.stop_sequence, gen.completion_tokens) == ("stop", "am", 4)
    # no max_tokens: the limit is max_model_len - prompt tokens (64 - 4)
    vllm.reply_tokens = ["w"] * 100
    assert chat(vllm).json()["usage"]["completion_tokens"] == 60


def test_vllm_chat_n_and_json_mode(vllm: FakeOpenAI) -> None:
    body = chat(vllm, n=2, max_tokens=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 8,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
    }
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
        content = chat(vllm, response_format=fmt).json()["choices"][0]["message"]["content"]
        assert json.loads(content) == {"answer": "Hello"}
    r = chat(vllm, structured_outputs={"json": {"type": "object"}})
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"answer": "Hello"}
    r = chat(vllm, structured_outputs={"regex": "[a-z]+"})
    assert r.json()["choices"][0]["message"]["content"] == "Hello, I am a fake model."
    assert vllm.requests_to("/v1/chat/completions")[-1].json["structured_outputs"] == {
        "regex": "[a-z]+"
    }


def test_vllm_chat_stream(vllm: FakeOpenAI) -> None:
    r, text = read_stream(
        f"{vllm.url}/v1/chat/completions",
        {"model": "base-model", "messages": MESSAGES, "stream": True},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert text.startswith("data: {") and text.endswith("data: [DONE]\n\n")
    events = sse_data(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert deltas == [*CANNED_REPLY, ""]  # one chunk per token, the EOS chunk is empty
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] is None
    assert "stop_reason" not in chunks[1]["choices"][0]  # exclude_unset
    assert all("usage" not in c for c in chunks)  # no stream_options -> no usage chunk


def test_vllm_chat_stream_usage_and_stop(vllm: FakeOpenAI) -> None:
    for options in ({"include_usage": True}, {}):  # include_usage defaults to True in vLLM
        _, text = read_stream(
            f"{vllm.url}/v1/chat/completions",
            {
                "messages": MESSAGES,
                "stream": True,
                "stream_options": options,
                "stop": "fake m",
            },
        )
        chunks = [json.loads(e) for e in sse_data(text)[:-1]]
        usage = chunks[-1]
        assert usage["choices"] == [] and set(usage) == {
            "id", "object", "created", "model", "choices", "usage"
        }  # fmt: skip
        assert usage["usage"] == {"prompt_tokens": 4, "total_tokens": 11, "completion_tokens": 7}
        final = chunks[-2]["choices"][0]
        assert (final["finish_reason"], final["stop_reason"]) == ("stop", "fake m")
        # a partial stop string is withheld while the stream runs (len("fake m") - 1 chars)
        content = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1])
        assert content == "Hello, I am a " == vllm.expected_text(PROMPT, stop="fake m")
    r = chat(vllm, stream_options={"include_usage": True})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Stream options can only be defined when `stream=True`."


def test_vllm_completions(vllm: FakeOpenAI) -> None:
    r = httpx.post(f"{vllm.url}/v1/completions", json={"model": "base-model", "prompt": "a b c"})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == vllm.expected_text("a b c")
    assert body["usage"]["prompt_tokens"] == 3
    _, text = read_stream(
        f"{vllm.url}/v1/completions",
        {"prompt": "a b c", "stream": True, "max_tokens": 2, "stream_options": {}},
    )
    events = sse_data(text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Hello", ","]
    assert chunks[0]["choices"][0] == {
        "index": 0,
        "text": "Hello",
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }
    assert chunks[0]["usage"] is None
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}


def test_vllm_errors(vllm: FakeOpenAI) -> None:
    def error(r: httpx.Response) -> tuple[int, str, str]:
        err = r.json()["error"]
        assert err["code"] == r.status_code and err["param"] is None
        return r.status_code, err["type"], err["message"]

    assert error(chat(vllm, model="gpt-4")) == (
        404,
        "NotFoundError",
        "The model `gpt-4` does not exist.",
    )
    for field, value, message in (
        ("temperature", -1, "temperature must be non-negative, got -1.0."),
        ("top_p", 0, "top_p must be in (0, 1], got 0.0."),
        ("top_k", -2, "top_k must be 0 (disable), or at least 1, got -2."),
        ("repetition_penalty", 0, "repetition_penalty must be greater than zero, got 0.0."),
        ("max_tokens", 0, "max_tokens must be at least 1, got 0."),
        ("n", 0, "n must be at least 1, got 0."),
    ):
        assert error(chat(vllm, **{field: value})) == (400, "BadRequestError", message)
    long_messages = [{"role": "user", "content": "w " * 64}]
    assert error(chat(vllm, messages=long_messages))[2] == (
        "This model's maximum context length is 64 tokens. However, your request has 64 input "
        "tokens. Please reduce the length of the input messages."
    )
    assert error(chat(vllm, max_tokens=61))[2] == (
        "'max_tokens' or 'max_completion_tokens' is too large: 61. This model's maximum context "
        "length is 64 tokens and your request has 4 input tokens (61 > 64 - 4)."
    )
    assert error(chat(vllm, response_format={"type": "json_schema"}))[2].startswith(
        "When response_format type is 'json_schema'"
    )
    vllm.fail_next_openai(503, "Service Unavailable", "ServiceUnavailableError")
    assert error(chat(vllm)) == (503, "ServiceUnavailableError", "Service Unavailable")
    assert chat(vllm).status_code == 200
    r = httpx.get(f"{vllm.url}/v1/nothing")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    with FakeOpenAI(legacy_errors=True) as old:
        r = httpx.post(f"{old.url}/v1/completions", json={"model": "x", "prompt": "p"})
        assert r.json() == {
            "object": "error",
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }


def test_vllm_in_stream_error(vllm: FakeOpenAI) -> None:
    vllm.error_after_tokens = (2, "engine died")
    r, text = read_stream(f"{vllm.url}/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    assert r.status_code == 200
    events = sse_data(text)
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:3]] == [
        "Hello",
        ",",
    ]
    # json.dumps, so with spaces, unlike the chunks
    assert events[-2] == (
        '{"error": {"message": "engine died", "type": "BadRequestError", "param": null, '
        '"code": 400}}'
    )
    r = chat(vllm)  # the same fault, non-streaming: an error response
    assert (r.status_code, r.json()["error"]["message"]) == (400, "engine died")


def test_vllm_server_drops_connection(vllm: FakeOpenAI) -> None:
    vllm.disconnect_after_tokens = 3
    lines = stream_until_broken(
        f"{vllm.url}/v1/chat/completions", {"messages": MESSAGES, "stream": True}
    )
    contents = [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines]
    assert contents == ["", "Hello", ",", " I"]  # role chunk + 3 tokens, then the cut
    with pytest.raises(httpx.RemoteProtocolError):
        chat(vllm)
    assert vllm.disconnects == 0  # the server hung up, not the client


def test_vllm_client_disconnect_is_seen_quickly(vllm: FakeOpenAI) -> None:
    vllm.token_delay_s = 0.5
    with httpx.stream(
        "POST", f"{vllm.url}/v1/chat/completions", json={"messages": MESSAGES, "stream": True}
    ) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    closed_at = time.monotonic()
    assert vllm.wait_for_disconnects(1, timeout=1.0)
    seen_at = vllm.last_disconnect_at
    assert seen_at is not None and seen_at - closed_at < 0.5


def test_vllm_slow_first_token(vllm: FakeOpenAI) -> None:
    vllm.first_token_delay_s = 0.3
    t0 = time.monotonic()
    with httpx.stream(
        "POST", f"{vllm.url}/v1/chat/completions", json={"messages": MESSAGES, "stream": True}
    ) as r:
        headers_at = time.monotonic() - t0
        lines = r.iter_lines()
        first = next(lines)
        first_at = time.monotonic() - t0
        rest = [line for line in lines if line]
    assert headers_at < 0.25 <= 0.3 <= first_at
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "data: [DONE]"
    vllm.first_token_delay_s = 0.0
    vllm.token_delay_s = 0.02
    t0 = time.monotonic()
    chat(vllm)  # unary requests take the whole generation's time: 8 gaps after the first
    assert time.monotonic() - t0 >= 0.16


def test_vllm_lora(vllm: FakeOpenAI) -> None:
    url = vllm.url
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert vllm.loaded_adapters == ["sql"] and vllm.lora_paths == {"sql": "/a/sql"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/b"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidUserInput"
    assert "has already been loaded" in r.json()["error"]["message"]
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "sql", "lora_path": "/b", "load_inplace": True},
    )
    assert r.status_code == 200 and vllm.lora_paths == {"sql": "/b"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.json()["error"]["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    vllm.missing_lora_paths.add("/nope")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "/nope"})
    assert (r.status_code, r.json()["error"]["message"]) == (
        404,
        "Loading lora n failed: No adapter found for /nope",
    )

    cards = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
        ("base-model", "base-model", None),
        ("alias", "base-model", None),
        ("sql", "/b", "base-model"),
    ]
    assert cards[0]["max_model_len"] == 64 and cards[2]["max_model_len"] is None
    assert cards[0]["owned_by"] == "vllm" and cards[0]["permission"][0]["object"] == (
        "model_permission"
    )
    body = chat(vllm, model="sql").json()
    assert body["model"] == "sql"

    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert (r.status_code, r.json()["error"]) == (
        404,
        {
            "message": "The lora adapter 'sql' cannot be found.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
    )
    assert chat(vllm, model="sql").status_code == 404
    assert len(vllm.requests_to("/v1/load_lora_adapter")) == 5

    with FakeOpenAI(lora_modules={"static": "/s"}) as no_runtime:
        assert no_runtime.loaded_adapters == ["static"]
        r = httpx.post(
            f"{no_runtime.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"}
        )
        assert r.status_code == 404  # the routes exist only with enable_lora


def test_vllm_health_version_and_reset(vllm: FakeOpenAI) -> None:
    r = httpx.get(f"{vllm.url}/health")
    assert (r.status_code, r.content) == (200, b"")
    assert httpx.get(f"{vllm.url}/version").json() == {"version": "0.11.0"}
    vllm.reply_tokens = ["x"]
    vllm.token_delay_s = 1
    vllm.reset()
    assert vllm.reply_tokens is None and vllm.token_delay_s == 0
    vllm.reply_fn = lambda prompt: [prompt.upper()]
    assert chat(vllm).json()["choices"][0]["message"]["content"] == PROMPT.upper()


def test_vllm_concurrent_streams(vllm: FakeOpenAI) -> None:
    vllm.token_delay_s = 0.01
    results: list[str] = []

    def run() -> None:
        _, text = read_stream(f"{vllm.url}/v1/completions", {"prompt": "p", "stream": True})
        results.append("".join(json.loads(e)["choices"][0]["text"] for e in sse_data(text)[:-1]))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert results == [vllm.expected_text("p")] * 4
