"""Log probabilities through the gateway with the openai SDK: chat's `logprobs.content` and
completions' parallel lists carry the LLM server's values (the fake model's deterministic
ones), unary and streamed; a model whose backend has none is a 400 naming `logprobs`."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from daert.testing import ServerProcess

from tests.fakes.llm import CANNED_REPLY, token_logprob
from tests.fakes.openai import FakeOpenAI
from tests.gateway.conftest import CHAT_MODEL, OLLAMA_MODEL

HELLO = [{"role": "user", "content": "Say hello"}]
# Where each token of the fake's reply starts in its text.
OFFSETS = [len("".join(CANNED_REPLY[:i])) for i in range(len(CANNED_REPLY))]


@pytest.fixture
def client(gateway_server: ServerProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=api_key, max_retries=0)


def expected_content(top: int) -> list[dict[str, Any]]:
    """OpenAI's chat entries for the fake's reply: each token, then its `top` alternatives
    (the token itself, then the fake's invented ones, each 1 less likely)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [
        {
            **entry(t, token_logprob(t)),
            "top_logprobs": [entry(t + "~" * k, token_logprob(t) - k) for k in range(top)],
        }
        for t in CANNED_REPLY
    ]


def test_chat_logprobs_come_back(client: openai.OpenAI, fake_vllm: FakeOpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, temperature=0, logprobs=True, top_logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [e.model_dump() for e in logprobs.content] == expected_content(2)
    sent = fake_vllm.requests_to("/v1/chat/completions")[-1].json
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, temperature=0)
    assert plain.choices[0].logprobs is None
    assert "logprobs" not in fake_vllm.requests_to("/v1/chat/completions")[-1].json


def test_streamed_chat_logprobs_come_per_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, temperature=0, logprobs=True, stream=True
    )
    entries = []
    text = ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs and choice.logprobs.content:
            entries += [e.model_dump() for e in choice.logprobs.content]
    assert entries == expected_content(0)
    assert "".join(e["token"] for e in entries) == text


def test_completion_logprobs_unary_and_streamed(
    client: openai.OpenAI, fake_vllm: FakeOpenAI
) -> None:
    reply = client.completions.create(
        model=CHAT_MODEL, prompt="Say hello", temperature=0, max_tokens=20, logprobs=1
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == list(CANNED_REPLY)
    assert logprobs.token_logprobs == [token_logprob(t) for t in CANNED_REPLY]
    assert logprobs.top_logprobs == [{t: token_logprob(t)} for t in CANNED_REPLY]
    assert logprobs.text_offset == OFFSETS
    assert fake_vllm.requests_to("/v1/completions")[-1].json["logprobs"] == 1
    stream = client.completions.create(
        model=CHAT_MODEL, prompt="Say hello", temperature=0, max_tokens=20, logprobs=0,
        stream=True,
    )  # fmt: skip
    tokens, offsets = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert tokens == list(CANNED_REPLY)
    assert offsets == OFFSETS


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_without_logprobs_is_a_400_naming_them(
    client: openai.OpenAI, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=OLLAMA_MODEL, messages=HELLO, logprobs=True, stream=stream
        )
    error = caught.value.response.json()["error"]
    assert error["param"] == "logprobs"
    assert error["code"] == "unsupported"
    assert "Ollama does not return log probabilities" in error["message"]
    # The same model answers without them.
    reply = client.chat.completions.create(model=OLLAMA_MODEL, messages=HELLO)
    assert reply.choices[0].message.content


def test_alternatives_out_of_range_name_top_logprobs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, logprobs=True, top_logprobs=21
        )
    assert caught.value.response.json()["error"]["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CHAT_MODEL, prompt="Say hello", logprobs=21)
    assert caught.value.response.json()["error"]["param"] == "logprobs"
