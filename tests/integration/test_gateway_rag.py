"""The gateway's RAG step against the real services as subprocesses: embedding (MiniLM),
retrieval on the session's PostgreSQL + pgvector, rerank (its embedded default) and context
(a Hugging Face tokenizer made here; its generation service is not there, so AUTO condenses
extractively). The corpus is a handful of documents for two tenants, upserted with the
embedding service's vectors and the metadata keys the ingestion pipeline writes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from daert.clients import (
    ContextClient,
    EmbeddingClient,
    RerankClient,
    RetrievalClient,
    field_violations,
)
from daert.gateway.prompts import NOTHING_FOUND, grounded_prompt, passage_block
from daert.gateway.rag import Grounded, RagOptions, RagPipeline, estimate_tokens
from daert.testing import ServerProcess
from daert.v1 import common_pb2, context_pb2

from tests.rag_corpus import (
    ACME,
    ACME_CHUNKS,
    ACME_ONLY,
    COLLECTION,
    CORPUS,
    GLOBEX,
    GLOBEX_CHUNKS,
    NIGHTJAR,
    load_corpus,
    source_uri,
)

MODES = ["hybrid", "vector", "keyword"]


def user(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)


def assistant(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=content)


def system(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=content)


@pytest.fixture(scope="module")
async def corpus(embedding_server: ServerProcess, retrieval_server: ServerProcess) -> None:
    await load_corpus(embedding_server.target, retrieval_server.target)


@pytest.fixture
async def clients(
    corpus: None,
    embedding_server: ServerProcess,
    retrieval_server: ServerProcess,
    rerank_server: ServerProcess,
    rag_context_server: ServerProcess,
) -> AsyncIterator[dict[str, Any]]:
    async with (
        EmbeddingClient(embedding_server.target) as embedding,
        RetrievalClient(retrieval_server.target) as retrieval,
        RerankClient(rerank_server.target) as rerank,
        ContextClient(rag_context_server.target, timeout_s=60) as context,
    ):
        yield {"embedding": embedding, "retrieval": retrieval, "rerank": rerank, "context": context}


@pytest.fixture
def rag(clients: dict[str, Any]) -> RagPipeline:
    return RagPipeline(**clients, tokenizer="tiny")


async def ground(
    rag: RagPipeline,
    question: str,
    *,
    tenant: str = ACME,
    history: list[common_pb2.ChatMessage] | None = None,
    budget: int = 100_000,
    **options: Any,
) -> Grounded:
    return await rag.ground(
        tenant=tenant,
        options=RagOptions(**{"collection": COLLECTION, **options}),
        messages=[*(history or []), user(question)],
        token_budget=budget,
    )


def passage_numbers(prompt: common_pb2.ChatMessage) -> list[int]:
    """The [n] that open the passage blocks of a grounded prompt."""
    return [int(n) for n in re.findall(r"^\[(\d+)\]", prompt.content, re.MULTILINE)]


async def count(context: ContextClient, messages: list[common_pb2.ChatMessage]) -> int:
    reply = await context.stub.CountTokens(
        context_pb2.CountTokensRequest(messages=messages, tokenizer="tiny")
    )
    return int(reply.tokens)


# --------------------------------------------------------------------------- citations


@pytest.mark.parametrize(
    ("question", "chunk_id"),
    [
        ("How often must the Helix-9 coolant pump be inspected?", "manual-0"),
        ("Which kit replaces worn Helix-9 pump seals?", "manual-1"),
        ("When does the Lisbon office close?", "lisbon-0"),
    ],
)
async def test_the_top_citation_is_the_chunk_holding_the_answer(
    rag: RagPipeline, question: str, chunk_id: str
) -> None:
    grounded = await ground(rag, question)
    top = grounded.citations[0]
    document = chunk_id.rsplit("-", 1)[0]
    title, text = ACME_CHUNKS[chunk_id]
    assert top.chunk_id == chunk_id
    assert (top.index, top.document_id, top.title) == (1, document, title)
    assert top.source_uri == source_uri(ACME, document)
    assert text.startswith(top.snippet.rstrip("…"))
    assert [c.index for c in grounded.citations] == list(range(1, len(grounded.citations) + 1))
    scores = [c.score for c in grounded.citations]
    assert scores == sorted(scores, reverse=True)
    assert 0 <= scores[-1] <= scores[0] <= 1

    prompt, *rest = grounded.messages
    assert prompt.role == common_pb2.ROLE_SYSTEM
    assert f"[1] {top.title}\n{text}" in prompt.content
    assert rest == [user(question)]


async def test_top_n_bounds_the_passages_and_every_one_is_in_the_prompt(rag: RagPipeline) -> None:
    grounded = await ground(rag, "What happens to the Helix-9?", top_k=6, top_n=2)
    assert len(grounded.citations) == 2
    assert passage_numbers(grounded.messages[0]) == [1, 2]


# --------------------------------------------------------------------------- tenants


@pytest.mark.parametrize("mode", MODES)
async def test_a_tenant_never_retrieves_another_tenants_chunks(rag: RagPipeline, mode: str) -> None:
    theirs = await ground(rag, NIGHTJAR, tenant=GLOBEX, mode=mode)
    assert theirs.citations[0].chunk_id == "nightjar-0"

    ours = await ground(rag, NIGHTJAR, tenant=ACME, mode=mode)
    assert not {c.chunk_id for c in ours.citations} & GLOBEX_CHUNKS
    assert all(c.source_uri.startswith(f"file:///{ACME}/") for c in ours.citations)
    assert "amber-42" not in ours.messages[0].content


async def test_a_collection_of_another_tenant_is_not_found(rag: RagPipeline) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ground(rag, "anything?", tenant=GLOBEX, collection=ACME_ONLY)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_collection_is_not_found(rag: RagPipeline, mode: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ground(rag, "anything?", collection="no_such_collection", mode=mode)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_malformed_filter_is_invalid_naming_the_filter(rag: RagPipeline) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ground(rag, "When does the office open?", filter={"region": {"near": "us"}})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The contract's path: under `rag.` it is the 400's param for the gateway.
    assert list(field_violations(caught.value)) == ["filter.region.near"]


# --------------------------------------------------------------------------- filters


async def test_a_filter_narrows_the_results(rag: RagPipeline) -> None:
    question = "What time does the office open on weekdays?"
    regions = {d: r for d, _, r, _ in CORPUS[ACME]}
    unfiltered = await ground(rag, question)
    assert {"lisbon", "denver"} <= {c.document_id for c in unfiltered.citations}

    for region, office in (("eu", "lisbon"), ("us", "denver")):
        filtered = await ground(rag, question, filter={"region": region})
        assert filtered.citations[0].document_id == office
        assert {regions[c.document_id] for c in filtered.citations} == {region}


async def test_no_results_still_grounds_saying_nothing_was_found(rag: RagPipeline) -> None:
    history = [system("Be brief."), user("Hello"), assistant("Hi! Ask me anything.")]
    for grounded in (
        await ground(rag, "When does the office open?", history=history, filter={"region": "mars"}),
        await ground(rag, "When does the office open?", history=history, collection=ACME_ONLY),
    ):
        assert grounded.citations == []
        assert grounded.messages == [
            system(grounded_prompt([])),
            *history,
            user("When does the office open?"),
        ]
        assert NOTHING_FOUND in grounded.messages[0].content


# --------------------------------------------------------------------------- budget


def long_history(turns: int) -> list[common_pb2.ChatMessage]:
    history = [system("Answer in English.")]
    for i in range(turns):
        filler = f"Turn {i} is about the quick brown fox near the river bank. " * 6
        history.append(user(filler) if i % 2 == 0 else assistant(filler))
    return history


async def test_the_messages_fit_the_budget_as_the_context_service_counts(
    rag: RagPipeline, clients: dict[str, Any]
) -> None:
    context: ContextClient = clients["context"]
    question = "How often must the Helix-9 coolant pump be inspected?"
    history = long_history(8)
    roomy = await ground(rag, question, history=history, top_n=4)
    assert len(roomy.citations) == 4
    assert passage_numbers(roomy.messages[0]) == [1, 2, 3, 4]
    assert roomy.messages[1:] == [*history, user(question)]
    whole = await count(context, roomy.messages)

    # Room for the prompt with all four passages, but not for the whole history: older
    # turns are condensed or dropped, the passages stay.
    prompt_and_question = await count(context, [roomy.messages[0], history[0], user(question)])
    budget = prompt_and_question + (whole - prompt_and_question) // 3
    fitted = await ground(rag, question, history=history, top_n=4, budget=budget)
    assert await count(context, fitted.messages) <= budget
    assert fitted.citations == roomy.citations
    assert fitted.messages[0] == roomy.messages[0]
    assert fitted.messages[-1] == user(question)
    assert len(fitted.messages) < len(roomy.messages)

    # Room for the first two passages and half the third (the estimate over-counts a
    # little): the lower ranks give way, and so does every old turn.
    blocks = [passage_block(c.index, ACME_CHUNKS[c.chunk_id][1], c.title) for c in roomy.citations]
    third = await count(context, [system(blocks[2])])
    budget = await count(context, [system(grounded_prompt(blocks[:2])), history[0], user(question)])
    budget += third // 2
    tight = await ground(rag, question, history=history, top_n=4, budget=budget)
    assert await count(context, tight.messages) <= budget
    assert tight.citations == roomy.citations[:2]
    assert tight.citations[0].chunk_id == "manual-0"
    assert tight.messages[-1] == user(question)
    assert passage_numbers(tight.messages[0]) == [1, 2]
    assert all(turn not in tight.messages for turn in history[1:])


async def test_the_current_turn_is_never_condensed_passages_give_way(
    rag: RagPipeline, clients: dict[str, Any]
) -> None:
    """A tool round after the question makes two units of the current turn, and the context
    service keeps only the newest one for sure (the older ones fit in what is left after the
    quarter it holds back for a summary): when the question would be condensed, the lowest
    passages make room for it."""
    context: ContextClient = clients["context"]
    question = "How often must the Helix-9 coolant pump be inspected?"
    current = [
        user(question),
        assistant("Let me look that up in the maintenance records."),
        common_pb2.ChatMessage(
            role=common_pb2.ROLE_TOOL,
            content="records: " + "inspection at 380 hours, pump pressure nominal; " * 6,
        ),
    ]
    history = long_history(8)
    options = RagOptions(COLLECTION, top_n=4)
    roomy = await rag.ground(
        tenant=ACME, options=options, messages=[*history, *current], token_budget=100_000
    )
    assert len(roomy.citations) == 4
    # All four passages fit the estimate, but the question does not fit beside the tool
    # round in three quarters of what is left: the fourth passage gives way.
    turn = await count(context, current)
    budget = await count(context, [roomy.messages[0], history[0], *current]) + turn // 5
    fitted = await rag.ground(
        tenant=ACME, options=options, messages=[*history, *current], token_budget=budget
    )
    assert await count(context, fitted.messages) <= budget
    assert fitted.messages[-3:] == current
    assert len(fitted.citations) == 3
    assert fitted.citations == roomy.citations[: len(fitted.citations)]
    assert passage_numbers(fitted.messages[0]) == [c.index for c in fitted.citations]


async def test_without_the_context_service_a_character_estimate_trims(
    clients: dict[str, Any],
) -> None:
    rag = RagPipeline(**{**clients, "context": None})
    question = "How often must the Helix-9 coolant pump be inspected?"
    history = long_history(8)
    roomy = await ground(rag, question, history=history, top_n=4)
    assert len(roomy.citations) == 4
    assert roomy.messages[1:] == [*history, user(question)]

    # Two old turns too many, and half a turn for the estimate's over-count of the prompt.
    turn = estimate_tokens(history[1])
    budget = sum(estimate_tokens(m) for m in roomy.messages) - 2 * turn + turn // 2
    fitted = await ground(rag, question, history=history, top_n=4, budget=budget)
    assert sum(estimate_tokens(m) for m in fitted.messages) <= budget
    assert fitted.citations == roomy.citations
    # The two oldest turns went; the system messages and the newer turns stayed, in order.
    assert fitted.messages == [roomy.messages[0], history[0], *history[3:], user(question)]
