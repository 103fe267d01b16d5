"""Tests of the fake LLM inference servers (vLLM/OpenAI, TGI, Ollama chat)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from . import CANNED_REPLY, FakeOllama, FakeOpenAI, FakeTGI
from .llm import token_logprob

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
PROMPT = "be brief hi there"  # the chat prompt as the fakes see it: contents joined by a space
PROMPT_REPLY = "".join(CANNED_REPLY)


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


def test_tgi_messages_api_flavour() -> None:
    with FakeOpenAI(models=["base-model"], flavour="tgi") as tgi:
        body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        r, text = read_stream(f"{tgi.url}/v1/chat/completions", body)
        assert text.startswith('data:{"object":"chat.completion.chunk","id":""')
        assert "data: " not in text and text.endswith("data:[DONE]\n\n")
        chunks = [json.loads(e) for e in sse_data(text)[:-1]]
        assert len(chunks) == len(CANNED_REPLY) + 1  # one per token, EOS included
        assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == PROMPT_REPLY
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 9
        assert all(c["usage"] is None for c in chunks[:-1])
        r = chat(tgi)
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": PROMPT_REPLY}
        assert r.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
        tgi.error_after_tokens, tgi.error_type = (0, ""), "overloaded"
        r, text = read_stream(f"{tgi.url}/v1/chat/completions", body)
        assert r.status_code == 200
        assert text == (
            'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\ndata:[DONE]\n\n'
        )
        r = chat(tgi)
        assert (r.status_code, r.json()["error_type"]) == (429, "overloaded")


def test_legacy_llama_cpp_sends_stream_errors_as_an_error_field() -> None:
    """llama.cpp servers before the split into server-context.cpp (PR #16486)."""
    with FakeOpenAI(models=["base-model"], flavour="llama.cpp", legacy_errors=True) as llama:
        llama.error_after_tokens, llama.error_type = (1, "context full"), "validation"
        body = {"messages": MESSAGES, "stream": True}
        _, text = read_stream(f"{llama.url}/v1/chat/completions", body)
        assert text.endswith(
            'error: {"code":400,"message":"context full","type":"invalid_request_error"}\n\n'
            "data: [DONE]\n\n"
        )


def test_vllm_server_drops_connection(vllm: FakeOpenAI) -> None:
    vllm.disconnect_after_tokens = 3
    lines = stream_until_broken(
        f"{vllm.url}/v1/chat/completions", {"messages": MESSAGES, "stream": True}
    )
    contents = [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines]
    assert contents == ["", "Hello", ",", " I"]  # role chunk + 3 tokens, then the cut
    with pytest.raises(httpx.RemoteProtocolError):
        chat(vllm)
    vllm.disconnect_after_tokens = 9  # every token sent, then cut before `data: [DONE]`
    lines = stream_until_broken(
        f"{vllm.url}/v1/chat/completions", {"messages": MESSAGES, "stream": True}
    )
    assert len(lines) == 10 and lines[-1] != "data: [DONE]"
    assert vllm.disconnects == 0  # the server hung up, not the client


def test_vllm_client_disconnect_is_seen_while_waiting(vllm: FakeOpenAI) -> None:
    # The next token is a minute away, past the wait below: the disconnect is seen while
    # the fake waits, not when its next write would fail.
    vllm.token_delay_s = 60
    with httpx.stream(
        "POST", f"{vllm.url}/v1/chat/completions", json={"messages": MESSAGES, "stream": True}
    ) as r:
        events = r.iter_lines()  # kept: a dropped iterator would close the stream already
        first = next(events)
        assert first.startswith("data: ")
        closed_at = time.monotonic()  # leaving the block closes the connection
    assert vllm.wait_for_disconnects(1, timeout=30.0)
    seen_at = vllm.last_disconnect_at
    assert seen_at is not None and seen_at >= closed_at


def test_vllm_slow_first_token(vllm: FakeOpenAI) -> None:
    # vLLM sends the headers at once: they come (within the 30 s timeout) while the first
    # token is held for the hour, then lowering the delay releases it.
    vllm.first_token_delay_s = 3600
    url = f"{vllm.url}/v1/chat/completions"
    body = {"messages": MESSAGES, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        vllm.first_token_delay_s = 0.0
        first = next(lines)
        rest = [line for line in lines if line]
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "data: [DONE]"
    vllm.first_token_delay_s = 0.3
    t0 = time.monotonic()
    with httpx.stream("POST", url, json=body) as r:
        next(r.iter_lines())
        assert time.monotonic() - t0 >= 0.3  # the first token waited the delay
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


# ------------------------------------------------------------------------------- TGI


@pytest.fixture
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI(max_input_tokens=8, max_total_tokens=200) as fake:
        yield fake


def generate(fake: FakeTGI, inputs: str = "hi there", **params: Any) -> httpx.Response:
    return httpx.post(f"{fake.url}/generate", json={"inputs": inputs, "parameters": params})


def test_tgi_generate(tgi: FakeTGI) -> None:
    r = generate(tgi)
    assert r.status_code == 200
    assert r.json() == {"generated_text": "Hello, I am a fake model."}
    assert r.headers["x-prompt-tokens"] == "2"
    assert r.headers["x-generated-tokens"] == "9"  # 8 tokens + EOS
    assert r.headers["x-compute-type"] == "gpu+optimized"
    assert r.headers["x-compute-characters"] == "8"
    for h in ("x-compute-time", "x-total-time", "x-inference-time", "x-time-per-token"):
        assert h in r.headers
    body = generate(tgi, details=True, seed=7, do_sample=True, max_new_tokens=20).json()
    details = body["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert (details["finish_reason"], details["generated_tokens"], details["seed"]) == (
        "eos_token",
        9,
        7,
    )
    assert details["prefill"] == []
    assert [t["text"] for t in details["tokens"]] == [*CANNED_REPLY, "</s>"]
    assert details["tokens"][-1] == {"id": 2, "text": "</s>", "logprob": -0.125, "special": True}
    assert all(not t["special"] for t in details["tokens"][:-1])
    greedy = generate(tgi, details=True).json()["details"]
    assert greedy["seed"] is None  # greedy decoding reports no seed
    prefill = generate(tgi, decoder_input_details=True).json()["details"]["prefill"]
    assert [p["text"] for p in prefill] == ["hi", "there"] and prefill[0]["logprob"] is None
    assert generate(tgi, return_full_text=True).json()["generated_text"] == (
        "hi thereHello, I am a fake model."
    )


def test_tgi_finish_reasons(tgi: FakeTGI) -> None:
    body = generate(tgi, details=True, max_new_tokens=3).json()
    assert body["generated_text"] == "Hello, I" == tgi.expected_text("hi there", max_new_tokens=3)
    assert body["details"]["finish_reason"] == "length"
    # TGI keeps the stop sequence in the text and stops only when the output ends with it
    body = generate(tgi, details=True, stop=[" am"]).json()
    assert body["generated_text"] == "Hello, I am"
    assert (body["details"]["finish_reason"], body["details"]["generated_tokens"]) == (
        "stop_sequence",
        4,
    )
    assert generate(tgi, stop=["I a"]).json()["generated_text"] == "Hello, I am a fake model."
    # max_new_tokens is checked first: reached on the EOS token it still says "length"
    body = generate(tgi, details=True, max_new_tokens=9).json()
    assert body["details"]["finish_reason"] == "length"
    assert tgi.generation("hi there", max_new_tokens=9).finish == "length"
    body = generate(tgi, details=True, grammar={"type": "json", "value": {"type": "object"}}).json()
    assert json.loads(body["generated_text"]) == {"answer": "Hello"}


def test_tgi_validation_errors(tgi: FakeTGI) -> None:
    for params, message in (
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        (
            {"max_new_tokens": 199},
            "`inputs` tokens + `max_new_tokens` must be <= 200. Given: 2 "
            "`inputs` tokens and 199 `max_new_tokens`",
        ),
        ({"grammar": {"type": "json", "value": "{oops"}}, "grammar is not valid: "),
    ):
        r = generate(tgi, **params)
        assert r.status_code == 422, params
        assert r.json()["error_type"] == "validation"
        assert r.json()["error"].startswith(f"Input validation error: {message}")
    r = generate(tgi, " ".join(["w"] * 9), max_new_tokens=5)
    assert r.json()["error"] == (
        "Input validation error: `inputs` must have less than 8 tokens. Given: 9"
    )
    assert generate(tgi, "").json()["error"] == "Input validation error: `inputs` cannot be empty"
    assert generate(tgi, " ".join(["w"] * 9), truncate=4).status_code == 200
    r = httpx.post(f"{tgi.url}/generate", json={"input": "typo"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert "missing field `inputs`" in r.text
    r = httpx.post(f"{tgi.url}/generate", content=b'{"inputs": "x"}')
    assert r.status_code == 415
    tgi.fail_next_tgi(429, "Model is overloaded", "overloaded")
    r = generate(tgi)
    assert (r.status_code, r.json()) == (
        429,
        {"error": "Model is overloaded", "error_type": "overloaded"},
    )


def test_tgi_stream(tgi: FakeTGI) -> None:
    r, text = read_stream(
        f"{tgi.url}/generate_stream",
        {"inputs": "hi there", "parameters": {"details": True, "max_new_tokens": 20}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert text.startswith('data:{"index":1,') and text.endswith("}\n\n")
    events = [json.loads(e) for e in sse_data(text)]
    assert [e["index"] for e in events] == list(range(1, 10))
    assert [e["token"]["text"] for e in events] == [*CANNED_REPLY, "</s>"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert set(events[0]) == {"index", "token", "generated_text", "details"}
    assert events[-1]["token"]["special"] is True
    assert events[-1]["generated_text"] == "Hello, I am a fake model."
    assert events[-1]["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": 9,
        "seed": None,
        "input_length": 2,
    }
    _, text = read_stream(f"{tgi.url}/generate_stream", {"inputs": "hi there"})
    assert json.loads(sse_data(text)[-1])["details"] is None  # details defaults to false
    with FakeTGI(sse_space=True) as spaced:
        _, text = read_stream(f"{spaced.url}/generate_stream", {"inputs": "hi"})
        assert text.startswith('data: {"index":1,')
        assert len(sse_data(text)) == 9


def test_tgi_stream_errors(tgi: FakeTGI) -> None:
    # validation errors arrive as an SSE event after a 200
    r, text = read_stream(
        f"{tgi.url}/generate_stream", {"inputs": "hi", "parameters": {"temperature": -1}}
    )
    assert r.status_code == 200
    assert text == (
        'data:{"error":"Input validation error: `temperature` must be strictly positive",'
        '"error_type":"validation"}\n\n'
    )
    _, text = read_stream(
        f"{tgi.url}/generate_stream", {"inputs": "hi", "parameters": {"best_of": 2}}
    )
    assert "`best_of` != 1 is not supported when streaming tokens" in text
    tgi.error_after_tokens = (3, "CUDA out of memory")
    r, text = read_stream(f"{tgi.url}/generate_stream", {"inputs": "hi"})
    events = [json.loads(e) for e in sse_data(text)]
    assert [e.get("index") for e in events] == [1, 2, 3, None]
    assert events[-1] == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }
    assert "event:" not in text
    r = generate(tgi)
    assert (r.status_code, r.json()["error_type"]) == (424, "generation")
    tgi.error_after_tokens, tgi.error_type = (1, ""), "overloaded"
    _, text = read_stream(f"{tgi.url}/generate_stream", {"inputs": "hi"})
    assert json.loads(sse_data(text)[-1]) == {
        "error": "Model is overloaded",
        "error_type": "overloaded",
    }


def test_tgi_shed_requests_answer_200_on_the_stream_and_429_on_generate(tgi: FakeTGI) -> None:
    tgi.fail_next_tgi(429, "Model is overloaded", "overloaded", times=2)
    r, text = read_stream(f"{tgi.url}/generate_stream", {"inputs": "hi"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert text == 'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
    r = generate(tgi)
    assert (r.status_code, r.json()["error_type"]) == (429, "overloaded")
    assert generate(tgi).status_code == 200  # both used up


def test_tgi_disconnects(tgi: FakeTGI) -> None:
    tgi.disconnect_after_tokens = 2
    lines = stream_until_broken(f"{tgi.url}/generate_stream", {"inputs": "hi"})
    assert [json.loads(line[5:])["index"] for line in lines] == [1, 2]
    tgi.disconnect_after_tokens = None
    # As for vLLM: the next token is past the wait, so the disconnect is seen while waiting.
    tgi.token_delay_s = 60
    with httpx.stream("POST", f"{tgi.url}/generate_stream", json={"inputs": "hi"}) as r:
        events = r.iter_lines()  # kept: a dropped iterator would close the stream already
        assert next(events).startswith("data:")
        closed_at = time.monotonic()  # leaving the block closes the connection
    assert tgi.wait_for_disconnects(1, timeout=30.0)
    seen_at = tgi.last_disconnect_at
    assert seen_at is not None and seen_at >= closed_at


def test_tgi_health_info_compat_and_adapters() -> None:
    with FakeTGI(adapters=["sql-lora"], model_id="org/m") as tgi:
        assert httpx.get(f"{tgi.url}/health").status_code == 200
        tgi.ready = False
        r = httpx.get(f"{tgi.url}/health")
        assert (r.status_code, r.json()) == (
            503,
            {"error": "unhealthy", "error_type": "healthcheck"},
        )
        info = httpx.get(f"{tgi.url}/info").json()
        assert info["model_id"] == "org/m" and info["router"] == "text-generation-router"
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (1024, 2048)
        # POST / answers a list and returns the full text by default
        r = httpx.post(f"{tgi.url}/", json={"inputs": "q", "parameters": {"max_new_tokens": 1}})
        assert r.json() == [{"generated_text": "qHello"}]
        r, text = read_stream(f"{tgi.url}/", {"inputs": "q", "stream": True})
        assert len(sse_data(text)) == 9
        # TGI answers an unknown adapter with the base model, no error
        assert generate(tgi, adapter_id="sql-lora").status_code == 200
        assert generate(tgi, adapter_id="nope").status_code == 200
        assert tgi.adapter_ids == [None, None, "sql-lora", "nope"]
        tgi.strict_adapters = True
        r = generate(tgi, adapter_id="nope")
        assert (r.status_code, r.json()["error_type"]) == (424, "generation")


# --------------------------------------------------------------------------- Ollama


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(chat_models=["llama3.2", "qwen2.5:7b"]) as fake:
        yield fake


def ollama_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_ollama_chat_stream(ollama: FakeOllama) -> None:
    r, text = read_stream(f"{ollama.url}/api/chat", {"model": "llama3.2", "messages": MESSAGES})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = ollama_lines(text)
    assert [c["message"]["content"] for c in lines[:-1]] == list(CANNED_REPLY)
    for chunk in lines[:-1]:
        assert list(chunk) == ["model", "created_at", "message", "done"]
        assert chunk["message"]["role"] == "assistant" and chunk["done"] is False
        assert chunk["model"] == "llama3.2"
        assert chunk["created_at"].endswith("Z") and "T" in chunk["created_at"]
    final = lines[-1]
    assert list(final) == [
        "model",
        "created_at",
        "message",
        "done_reason",
        "done",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["done"], final["done_reason"]) == (True, "stop")
    assert (final["prompt_eval_count"], final["eval_count"]) == (4, 9)
    assert all(
        isinstance(final[k], int) and final[k] > 0 for k in ("total_duration", "eval_duration")
    )


def test_ollama_chat_unary_options_and_format(ollama: FakeOllama) -> None:
    def post(**body: Any) -> dict[str, Any]:
        r = httpx.post(
            f"{ollama.url}/api/chat",
            json={"model": "qwen2.5:7b", "messages": MESSAGES, "stream": False, **body},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        data: dict[str, Any] = r.json()
        return data

    body = post()
    assert body["message"]["content"] == ollama.expected_text(PROMPT) == "".join(CANNED_REPLY)
    assert (body["done"], body["done_reason"], body["eval_count"]) == (True, "stop", 9)
    body = post(options={"num_predict": 2, "temperature": 0.1, "seed": 1, "num_ctx": 8})
    assert (body["message"]["content"], body["done_reason"], body["eval_count"]) == (
        "Hello,",
        "length",
        2,
    )
    body = post(options={"stop": [" fake"]})
    assert (body["message"]["content"], body["done_reason"]) == ("Hello, I am a", "stop")
    for fmt in ("json", {"type": "object", "properties": {"answer": {"type": "string"}}}):
        assert json.loads(post(format=fmt)["message"]["content"]) == {"answer": "Hello"}
    body = post(keep_alive="5m")
    assert ollama.requests_to("/api/chat")[-1].json["keep_alive"] == "5m"


def test_ollama_chat_stream_holds_back_partial_stop(ollama: FakeOllama) -> None:
    _, text = read_stream(
        f"{ollama.url}/api/chat",
        {"model": "llama3.2", "messages": MESSAGES, "options": {"stop": [" fake m"]}},
    )
    lines = ollama_lines(text)
    contents = [c["message"]["content"] for c in lines[:-1]]
    # " fake" could be the start of " fake m": it is held back, then cut with the stop
    assert contents == ["Hello", ",", " I", " am", " a"]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 7


def test_ollama_generate(ollama: FakeOllama) -> None:
    r, text = read_stream(
        f"{ollama.url}/api/generate",
        {"model": "llama3.2", "prompt": "[INST] hi [/INST]", "raw": True},
    )
    lines = ollama_lines(text)
    assert [c["response"] for c in lines[:-1]] == list(CANNED_REPLY)
    assert list(lines[0]) == ["model", "created_at", "response", "done"]
    assert "context" not in lines[-1]  # raw mode returns no context
    assert (lines[-1]["done"], lines[-1]["done_reason"], lines[-1]["prompt_eval_count"]) == (
        True,
        "stop",
        3,
    )
    r = httpx.post(
        f"{ollama.url}/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}
    )
    body = r.json()
    assert body["response"] == "Hello, I am a fake model."
    assert list(body)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    r = httpx.post(
        f"{ollama.url}/api/generate",
        json={"model": "llama3.2", "prompt": "hi", "raw": True, "system": "s"},
    )
    assert (r.status_code, r.json()) == (
        400,
        {"error": "raw mode does not support template, system, or context"},
    )
    r = httpx.post(f"{ollama.url}/api/generate", json={"model": "llama3.2"})
    assert r.json()["done_reason"] == "load"


def test_ollama_chat_errors(ollama: FakeOllama) -> None:
    def post(**body: Any) -> httpx.Response:
        return httpx.post(f"{ollama.url}/api/chat", json={"messages": MESSAGES, **body})

    r = post(model="mistral")
    assert (r.status_code, r.json()) == (404, {"error": "model 'mistral' not found"})
    r = post(model="all-minilm")
    assert (r.status_code, r.json()) == (400, {"error": '"all-minilm" does not support chat'})
    r = post(model="llama3.2", format="yaml")
    assert r.status_code == 500
    assert r.json()["error"] == (
        'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object'
    )
    r = post(model="llama3.2", options={"temperature": "hot"})
    assert (r.status_code, r.json()) == (
        500,
        {"error": 'option "temperature" must be of type float32'},
    )
    r = httpx.post(f"{ollama.url}/api/chat", content=b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
    ollama.fail_next_ollama(
        503, "server busy, please try again.  maximum pending requests exceeded"
    )
    assert post(model="llama3.2").status_code == 503
    # the embedding API still works next to chat
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": "x"})
    assert r.json()["embeddings"] == [ollama.vector_for("x")]


def test_ollama_in_stream_error_and_drop(ollama: FakeOllama) -> None:
    ollama.error_after_tokens = (2, "llama runner process has terminated")
    r, text = read_stream(f"{ollama.url}/api/chat", {"model": "llama3.2", "messages": MESSAGES})
    assert r.status_code == 200
    lines = ollama_lines(text)
    assert [c.get("message", {}).get("content") for c in lines[:2]] == ["Hello", ","]
    assert lines[-1] == {"error": "llama runner process has terminated"}
    ollama.error_after_tokens = (0, "boom")  # nothing sent yet: an HTTP error
    r = httpx.post(f"{ollama.url}/api/chat", json={"model": "llama3.2", "messages": MESSAGES})
    assert (r.status_code, r.json()) == (500, {"error": "boom"})
    ollama.error_after_tokens = None
    ollama.disconnect_after_tokens = 3
    lines_seen = stream_until_broken(
        f"{ollama.url}/api/chat", {"model": "llama3.2", "messages": MESSAGES}
    )
    assert len(lines_seen) == 3
    assert ollama.disconnects == 0


def test_ollama_client_disconnect_and_slow_first_token(ollama: FakeOllama) -> None:
    ollama.first_token_delay_s = 0.3
    ollama.token_delay_s = 60  # past the wait below: the disconnect is seen while waiting
    t0 = time.monotonic()
    with httpx.stream(
        "POST", f"{ollama.url}/api/chat", json={"model": "llama3.2", "messages": MESSAGES}
    ) as r:
        events = r.iter_lines()  # kept: a dropped iterator would close the stream already
        first = next(events)
        assert time.monotonic() - t0 >= 0.3  # gin sends the headers with the first chunk
        assert json.loads(first)["message"]["content"] == "Hello"
        closed_at = time.monotonic()  # leaving the block closes the connection
    assert ollama.wait_for_disconnects(1, timeout=30.0)
    seen_at = ollama.last_disconnect_at
    assert seen_at is not None and seen_at >= closed_at


# ------------------------------------------------------------------------------ tool calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
WEATHER = {"city": "Paris", "unit": "celsius"}


def test_vllm_tool_calls_unary_and_streamed(vllm: FakeOpenAI) -> None:
    vllm.tool_calls = [("get_weather", WEATHER)]
    answer = chat(vllm, tools=TOOLS).json()["choices"][0]
    [call] = answer["message"]["tool_calls"]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps(WEATHER)}
    body = {"model": "base-model", "messages": MESSAGES, "tools": TOOLS, "stream": True,
            "stream_options": {}}  # fmt: skip
    _, text = read_stream(f"{vllm.url}/v1/chat/completions", body)
    chunks = [json.loads(d) for d in sse_data(text) if d != "[DONE]"]
    pieces = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    pieces = [p[0] for p in pieces if p]
    assert pieces[0]["function"] == {"name": "get_weather"} and pieces[0]["id"]
    assert len(pieces) == 1 + vllm.tool_argument_pieces
    assert "".join(p["function"].get("arguments", "") for p in pieces) == json.dumps(WEATHER)
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == vllm.tool_argument_pieces + 1
    # tool_choice "none" answers with text; a named tool that is not offered is refused.
    assert (
        chat(vllm, tools=TOOLS, tool_choice="none").json()["choices"][0]["message"]["tool_calls"]
        == []
    )
    refused = chat(vllm, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    assert refused.status_code == 400 and "Tool 'x' has not been passed" in refused.text
    assert chat(vllm, tool_choice="required").status_code == 400


def test_tgi_flavour_tool_calls() -> None:
    with FakeOpenAI(flavour="tgi", models=["base-model"]) as tgi:
        tgi.tool_calls = [("get_weather", WEATHER)]
        answer = chat(tgi, tools=TOOLS).json()["choices"][0]
        assert answer["finish_reason"] == "stop"
        [call] = answer["message"]["tool_calls"]
        assert call["id"] == "0" and call["function"]["arguments"] == json.dumps(WEATHER)
        body = {"model": "base-model", "messages": MESSAGES, "tools": TOOLS, "stream": True}
        _, text = read_stream(f"{tgi.url}/v1/chat/completions", body)
        assert text.startswith("data:{")
        chunks = [json.loads(d) for d in sse_data(text) if d != "[DONE]"]
        deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
        assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert {d["id"] for d in deltas} == {""}
        assert "".join(d["function"]["arguments"] for d in deltas) == json.dumps(WEATHER)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_ollama_tool_calls(ollama: FakeOllama) -> None:
    ollama.tool_calls = [("get_weather", WEATHER), ("get_time", {})]
    body = {"model": "llama3.2", "messages": MESSAGES, "tools": TOOLS, "stream": False}
    answer = httpx.post(f"{ollama.url}/api/chat", json=body).json()
    assert answer["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": WEATHER}},
        {"function": {"name": "get_time", "arguments": {}}},
    ]
    assert answer["done_reason"] == "stop" and answer["message"]["content"] == ""
    _, text = read_stream(f"{ollama.url}/api/chat", body | {"stream": True})
    lines = ollama_lines(text)
    assert [line["message"].get("tool_calls") for line in lines[:2]] == [
        [{"function": {"name": "get_weather", "arguments": WEATHER}}],
        [{"function": {"name": "get_time", "arguments": {}}}],
    ]
    assert lines[-1]["done"] is True and "tool_calls" not in lines[-1]["message"]
    # Arguments sent back as JSON text are Go's unmarshal error.
    turn = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
            "arguments": "{}"}}]}  # fmt: skip
    refused = httpx.post(f"{ollama.url}/api/chat", json=body | {"messages": [turn]})
    assert refused.status_code == 400 and "api.ToolCallFunctionArguments" in refused.text


# -------------------------------------------------------------------- log probabilities


def test_vllm_logprobs_chat_and_completions(vllm: FakeOpenAI) -> None:
    first = CANNED_REPLY[0]
    lp = token_logprob(first)
    assert chat(vllm).json()["choices"][0]["logprobs"] is None  # not asked for
    content = chat(vllm, logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == list(CANNED_REPLY)  # the EOS token has none
    assert content[0] == {
        "token": first,
        "logprob": lp,
        "bytes": list(first.encode()),
        "top_logprobs": [
            {"token": first, "logprob": lp, "bytes": list(first.encode())},
            {"token": first + "~", "logprob": lp - 1, "bytes": list((first + "~").encode())},
        ],
    }
    _, text = read_stream(
        f"{vllm.url}/v1/chat/completions",
        {"model": "base-model", "messages": MESSAGES, "stream": True, "logprobs": True},
    )
    chunks = [json.loads(e)["choices"] for e in sse_data(text)[:-1]]
    streamed = [e for c in chunks if c and c[0]["logprobs"] for e in c[0]["logprobs"]["content"]]
    assert [(e["token"], e["logprob"], e["top_logprobs"]) for e in streamed] == [
        (t, token_logprob(t), []) for t in CANNED_REPLY
    ]
    body = {"model": "base-model", "prompt": "p", "logprobs": 1}
    logprobs = httpx.post(f"{vllm.url}/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == list(CANNED_REPLY)
    assert logprobs["token_logprobs"] == [token_logprob(t) for t in CANNED_REPLY]
    assert logprobs["top_logprobs"][0] == {first: lp}
    assert logprobs["text_offset"][:3] == [0, len(first), len(first) + 1]


def test_tgi_top_n_tokens(tgi: FakeTGI) -> None:
    details = generate(tgi, details=True, top_n_tokens=2).json()["details"]
    tops = details["top_tokens"]
    assert len(tops) == len(details["tokens"])
    assert [t["text"] for t in tops[0]] == [CANNED_REPLY[0], CANNED_REPLY[0] + "~"]
    assert tops[0][1]["logprob"] == details["tokens"][0]["logprob"] - 1
    assert "top_tokens" not in generate(tgi, details=True).json()["details"]
    _, text = read_stream(
        f"{tgi.url}/generate_stream", {"inputs": "hi there", "parameters": {"top_n_tokens": 1}}
    )
    events = [json.loads(e) for e in sse_data(text)]
    assert all(e["top_tokens"] == [e["token"]] for e in events)
