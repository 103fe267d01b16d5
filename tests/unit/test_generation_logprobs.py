"""Log probabilities in the generation service and the gateway: validation naming
`top_logprobs`, the cache key, each backend's request fields and answers, merged deltas,
the FAILED_PRECONDITION detail naming `logprobs`, and OpenAI's shapes in the gateway."""

from __future__ import annotations

from typing import Any

import pytest
from daert.gateway.catalog import CatalogModel
from daert.gateway.schemas import ChatCompletionRequest, CompletionRequest
from daert.gateway.translate import chat_logprobs, completion_logprobs, generate_fields
from daert.generation.backends.base import UpstreamCall
from daert.generation.backends.openai import _request as openai_request
from daert.generation.backends.tgi import TgiBackend
from daert.generation.backends.wire import openai_logprobs, tgi_logprob
from daert.generation.cache import cache_key
from daert.generation.config import ModelConfig
from daert.generation.request import Delta, TokenLogprob, merge_deltas, parse_input
from daert.runtime.errors import FailedPrecondition, InvalidArgument
from daert.v1 import common_pb2, generation_pb2
from google.rpc import error_details_pb2


def parsed(prompt: bool = False, **fields: Any) -> Any:
    content: dict[str, Any] = (
        {"prompt": "hi"}
        if prompt
        else {"messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]}
    )
    return parse_input(generation_pb2.GenerateRequest(**content, **fields), 100_000)


@pytest.mark.parametrize(
    "fields",
    [{"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}, {"top_logprobs": -1}],
    ids=["without-logprobs", "over-20", "negative"],
)
def test_bad_top_logprobs_are_named(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parsed(**fields)
    assert caught.value.field == "top_logprobs"


def test_logprobs_parse() -> None:
    request = parsed(logprobs=True, top_logprobs=20)
    assert (request.logprobs, request.top_logprobs) == (True, 20)
    assert not parsed().logprobs


def test_the_cache_key_holds_logprobs_and_keeps_earlier_keys() -> None:
    def key(**fields: Any) -> str:
        return cache_key("openai", "m", "", "", parsed(**fields)).exact

    assert "logprobs" not in parsed().canonical()  # keys from before logprobs stay valid
    assert len({key(), key(logprobs=True), key(logprobs=True, top_logprobs=3)}) == 3


def test_openai_request_fields() -> None:
    def body(prompt: bool = False, **fields: Any) -> dict[str, Any]:
        return openai_request(UpstreamCall(parsed(prompt, **fields), "m"), stream=False)[1]

    chat = body(logprobs=True, top_logprobs=3)
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    completions = body(prompt=True, logprobs=True, top_logprobs=3)
    assert completions["logprobs"] == 3 and "top_logprobs" not in completions
    assert body(prompt=True, logprobs=True)["logprobs"] == 0  # the chosen token only
    assert "logprobs" not in body() and "logprobs" not in body(prompt=True)


def test_openai_answers_in_both_shapes() -> None:
    request = parsed(logprobs=True, top_logprobs=1)
    chat = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                # Out of order, and one more than asked (vLLM adds the sampled token).
                "top_logprobs": [
                    {"token": "Ho", "logprob": -2.0},
                    {"token": "Hi", "logprob": -0.5},
                ],
            }
        ]
    }
    assert openai_logprobs(chat, request) == (TokenLogprob("Hi", -0.5, (("Hi", -0.5),)),)
    completions = {
        "tokens": ["Hi", "!"],
        "token_logprobs": [-0.5, None],
        "top_logprobs": [{"Ho": -2.0, "Hi": -0.5}, None],
        "text_offset": [0, 2],
    }
    assert openai_logprobs(completions, request) == (
        TokenLogprob("Hi", -0.5, (("Hi", -0.5),)),
        TokenLogprob("!", -9999.0),  # a missing value reads as vLLM's zero probability
    )
    assert openai_logprobs(chat, parsed()) == ()  # not asked for: none, whatever came
    assert openai_logprobs(None, request) == ()


def test_tgi_asks_for_top_tokens_and_reads_them() -> None:
    backend = TgiBackend(ModelConfig(name="m", backend="tgi", url="http://tgi:80"))
    call = UpstreamCall(parsed(prompt=True, logprobs=True, top_logprobs=2), "m")
    parameters = backend._body(call)["parameters"]
    assert parameters["details"] is True and parameters["top_n_tokens"] == 2
    plain = backend._body(UpstreamCall(parsed(prompt=True, logprobs=True), "m"))["parameters"]
    assert "top_n_tokens" not in plain
    token = {"id": 5, "text": "Hi", "logprob": -0.5, "special": False}
    top = [token, {"id": 6, "text": "Ho", "logprob": -2.0, "special": False}]
    assert tgi_logprob(token, top, call.input) == TokenLogprob(
        "Hi", -0.5, (("Hi", -0.5), ("Ho", -2.0))
    )


def test_merged_deltas_keep_their_tokens_in_order() -> None:
    a, b = TokenLogprob("He", -0.25), TokenLogprob("llo", -0.5)
    assert merge_deltas([Delta("He", (a,)), Delta(""), Delta("llo", (b,))]) == Delta(
        "Hello", (a, b)
    )


def test_a_precondition_names_its_field() -> None:
    status = FailedPrecondition("Ollama does not return log probabilities", "logprobs")
    details = status.status_details()
    assert details is not None
    failure = error_details_pb2.PreconditionFailure()
    assert details.details[0].Unpack(failure)
    assert [(v.subject, v.description) for v in failure.violations] == [
        ("logprobs", "Ollama does not return log probabilities")
    ]
    assert FailedPrecondition("no field").status_details() is None


# --- the gateway ---------------------------------------------------------------------------

MODEL = CatalogModel(id="m", kind="generation", owned_by="vllm", generation_model="m")


def test_gateway_passes_chat_and_completion_logprobs() -> None:
    messages = [{"role": "user", "content": "hi"}]
    chat = ChatCompletionRequest(model="m", messages=messages, logprobs=True, top_logprobs=4)
    fields = generate_fields(chat, MODEL, "t")
    assert (fields["logprobs"], fields["top_logprobs"]) == (True, 4)
    plain = generate_fields(ChatCompletionRequest(model="m", messages=messages), MODEL, "t")
    assert (plain["logprobs"], plain["top_logprobs"]) == (False, 0)
    completion = generate_fields(CompletionRequest(model="m", prompt="hi", logprobs=2), MODEL, "t")
    assert (completion["logprobs"], completion["top_logprobs"]) == (True, 2)
    assert "logprobs" not in generate_fields(CompletionRequest(model="m", prompt="hi"), MODEL, "t")


def test_gateway_answers_in_openais_shapes() -> None:
    logprobs = [
        generation_pb2.TokenLogprob(
            token="é",
            logprob=-0.5,
            top_logprobs=[generation_pb2.TopLogprob(token="é", logprob=-0.5)],
        ),
        generation_pb2.TokenLogprob(token="!", logprob=-1.0),
    ]
    assert chat_logprobs(logprobs) == {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": [0xC3, 0xA9],
                "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]}],
            },
            {"token": "!", "logprob": -1.0, "bytes": [33], "top_logprobs": []},
        ]
    }
    assert completion_logprobs(logprobs, offset=3) == {
        "tokens": ["é", "!"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"é": -0.5}, {}],
        "text_offset": [3, 4],
    }
