"""Retrieval-augmented chat completions through the gateway: the openai SDK asks with
`extra_body={"rag": ...}`, real embedding, retrieval, rerank and context services ground the
answer, and the citations (and annotations for the [n] the model wrote) come back, unary and
in a chunk of their own before [DONE]. The tenant is the key's, never the body's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess

from tests.fakes.openai import FakeOpenAI
from tests.gateway.conftest import CHAT_MODEL, Keys, gateway_env
from tests.rag_corpus import ACME, COLLECTION, GLOBEX, NIGHTJAR, load_corpus, source_uri

QUESTION = [{"role": "user", "content": "How often must the Helix-9 coolant pump be inspected?"}]


@pytest.fixture(scope="module")
def rag_gateway(
    postgres: EmbeddedPostgres,
    redis_server: EmbeddedRedis,
    generation_server: ServerProcess,
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
    rerank_server: ServerProcess,
    rag_context_server: ServerProcess,
) -> Iterator[ServerProcess]:
    import asyncio

    asyncio.run(load_corpus(embedding_server.target, retrieval_server.target))
    env = gateway_env(
        postgres,
        redis_server,
        generation=generation_server.target,
        embedding=embedding_server.target,
        retrieval=retrieval_server.target,
        rerank=rerank_server.target,
        context=rag_context_server.target,
    )
    with ServerProcess("gateway", env) as server:
        yield server


def _client(gateway: ServerProcess, keys: Keys, tenant: str, **limits: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=keys.create(tenant, **limits), max_retries=0
    )


def test_answer_cites_the_chunk_holding_it(
    rag_gateway: ServerProcess, keys: Keys, fake_vllm: FakeOpenAI
) -> None:
    fake_vllm.reply_tokens = ["Every", " 400", " operating", " hours", " [1]", "."]
    reply = _client(rag_gateway, keys, ACME).chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, extra_body={"rag": {"collection": COLLECTION}}
    )
    citations = reply.model_extra["citations"]  # type: ignore[index]
    assert citations[0]["chunk_id"] == "manual-0"
    assert citations[0]["source_uri"] == source_uri(ACME, "manual")
    assert citations[0]["index"] == 1 and "400 operating hours" in citations[0]["snippet"]
    message = reply.choices[0].message
    assert message.content == "Every 400 operating hours [1]."
    (annotation,) = message.annotations or []
    assert annotation.type == "url_citation"
    assert annotation.url_citation.url == source_uri(ACME, "manual")
    start, end = annotation.url_citation.start_index, annotation.url_citation.end_index
    assert message.content[start:end] == "[1]"
    # The model was given the passage, numbered, in a grounded prompt before the question.
    sent = fake_vllm.requests_to("/v1/chat/completions")[-1].json["messages"]
    assert sent[0]["role"] == "system" and "[1]" in sent[0]["content"]
    assert "400 operating hours" in sent[0]["content"]
    assert sent[-1] == QUESTION[0]


def test_streamed_citations_come_in_a_chunk_of_their_own(
    rag_gateway: ServerProcess, keys: Keys, fake_vllm: FakeOpenAI
) -> None:
    fake_vllm.reply_tokens = ["Every", " 400", " hours", " [1]"]
    stream = _client(rag_gateway, keys, ACME).chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        stream=True,
        extra_body={"rag": {"collection": COLLECTION, "top_n": 2}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Every 400 hours [1]"
    last = chunks[-1]
    assert last.choices == []
    extra = last.model_extra or {}
    assert extra["citations"][0]["chunk_id"] == "manual-0"
    assert len(extra["citations"]) <= 2
    assert extra["annotations"][0]["url_citation"]["url"] == source_uri(ACME, "manual")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and chunks.index(finish[0]) < len(chunks) - 1


def test_a_tenant_never_retrieves_another_tenants_chunks(
    rag_gateway: ServerProcess, keys: Keys, fake_vllm: FakeOpenAI
) -> None:
    ask = [{"role": "user", "content": NIGHTJAR}]
    # The body cannot choose the tenant: the key's (acme) is used whatever it says.
    reply = _client(rag_gateway, keys, ACME).chat.completions.create(
        model=CHAT_MODEL,
        messages=ask,
        extra_body={"rag": {"collection": COLLECTION, "mode": "keyword"}, "tenant": GLOBEX},
    )
    cited = {c["document_id"] for c in reply.model_extra["citations"]}  # type: ignore[index]
    assert "nightjar" not in cited
    sent = json.dumps(fake_vllm.requests_to("/v1/chat/completions")[-1].json["messages"][0])
    assert "amber-42" not in sent
    theirs = _client(rag_gateway, keys, GLOBEX).chat.completions.create(
        model=CHAT_MODEL, messages=ask, extra_body={"rag": {"collection": COLLECTION}}
    )
    assert theirs.model_extra["citations"][0]["document_id"] == "nightjar"  # type: ignore[index]


def test_rag_errors(rag_gateway: ServerProcess, keys: Keys) -> None:
    client = _client(rag_gateway, keys, ACME)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, extra_body={"rag": {"collection": "nope"}}
        )
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            extra_body={"rag": {"collection": COLLECTION, "top_k": 2, "top_n": 3}},
        )
    assert caught.value.response.json()["error"]["param"] == "rag.top_n"
    limited = _client(rag_gateway, keys, ACME, collections=["other"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        limited.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, extra_body={"rag": {"collection": COLLECTION}}
        )
    assert denied.value.response.json()["error"]["param"] == "rag.collection"
