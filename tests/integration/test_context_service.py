"""The context service as a real gRPC server: a Hugging Face tokenizer made here, the real
generation service in front of the fake OpenAI-compatible server (deterministic summaries,
failures on demand), the real embedding service for EXTRACTIVE, and a real Redis for
rolling summaries. The same service over the embedded LLM is in test_embedded_llm.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from daert.clients import ContextClient
from daert.clients.base import field_violations
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, context_pb2

from tests.fakes.openai import FakeOpenAI
from tests.helpers import free_port
from tests.integration.context_support import (
    compress,
    conversation,
    make_tokenizer,
    msg,
    texts,
    tokenizers_env,
)
from tests.integration.generation_support import metric, models_env

CHAT = "/v1/chat/completions"
SUMMARY_DB = 2  # the context tests' own Redis database
S = context_pb2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def summarizer_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["summarizer"], max_model_len=100_000) as fake:
        yield fake


@pytest.fixture(scope="module")
def generation(summarizer_llm: FakeOpenAI) -> Iterator[ServerProcess]:
    env = models_env({"name": "summarizer", "backend": "openai", "url": summarizer_llm.url})
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        yield server


def _context_env(tokenizer_dir: Path, generation_target: str, **settings: str) -> dict[str, str]:
    return {
        "DAERT_CONTEXT_TOKENIZERS": tokenizers_env(
            tiny={"kind": "huggingface", "path": str(tokenizer_dir)}
        ),
        "DAERT_GENERATION_TARGET": generation_target,
        **{f"DAERT_CONTEXT_{k.upper()}": v for k, v in settings.items()},
    }


@pytest.fixture(scope="module")
def context_server(
    tokenizer_dir: Path,
    generation: ServerProcess,
    embedding_server: ServerProcess,
    redis_server: EmbeddedRedis,
) -> Iterator[ServerProcess]:
    env = _context_env(
        tokenizer_dir,
        generation.target,
        redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{SUMMARY_DB}",
        summary_chunk_tokens="400",
    )
    env["DAERT_EMBEDDING_TARGET"] = embedding_server.target
    with ServerProcess("context", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="module")
def context_without_llm(
    tokenizer_dir: Path, embedding_server: ServerProcess
) -> Iterator[ServerProcess]:
    """Generation points at a port nothing listens on."""
    env = _context_env(tokenizer_dir, f"127.0.0.1:{free_port()}")
    env["DAERT_EMBEDDING_TARGET"] = embedding_server.target
    with ServerProcess("context", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture
async def client(context_server: ServerProcess) -> AsyncIterator[ContextClient]:
    async with ContextClient(context_server.target, timeout_s=60) as client:
        yield client


async def count(client: ContextClient, messages: Any) -> int:
    reply = await client.stub.CountTokens(S.CountTokensRequest(messages=messages))
    return int(reply.tokens)


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- counting ----------------------------------------------------------------------------


async def test_count_tokens_is_the_length_of_the_templated_tokenization(
    client: ContextClient, tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    messages = [*conversation(5), msg("tool", "lookup returned 21 degrees", name="lookup")]
    reply = await client.stub.CountTokens(S.CountTokensRequest(messages=messages))
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rendered = reference.apply_chat_template(
        [{"role": r, "content": c, **({"name": "lookup"} if r == "tool" else {})}
         for r, c in texts(messages)],
        tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    expected = len(reference(rendered, add_special_tokens=False)["input_ids"])
    assert reply.tokens == expected
    assert reply.tokenizer == "tiny"
    assert len(reply.message_tokens) == len(messages)
    assert all(n > 0 for n in reply.message_tokens)
    # Each message's share includes its role formatting; the rest is the generation prompt.
    assert 0 < reply.tokens - sum(reply.message_tokens) < 10


async def test_count_tokens_bad_input(client: ContextClient) -> None:
    error = await error_of(client.stub.CountTokens(S.CountTokensRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in field_violations(error)
    bad_role = [msg("user", "hi"), common_pb2.ChatMessage(role=7, content="x")]
    error = await error_of(client.stub.CountTokens(S.CountTokensRequest(messages=bad_role)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].role" in field_violations(error)
    unknown = S.CountTokensRequest(messages=[msg("user", "hi")], tokenizer="nope")
    error = await error_of(client.stub.CountTokens(unknown))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "tokenizer 'nope'" in (error.details() or "")


# --- fitting -------------------------------------------------------------------------------

TABLE = [
    (conversation(30), 120),
    (conversation(30), 300),
    (conversation(60, system=""), 200),
    ([*conversation(4), msg("user", "fox " * 400)], 150),  # the newest turn alone is too big
    (conversation(200), 500),
]


@pytest.mark.parametrize("strategy", [S.COMPRESSION_STRATEGY_TRUNCATE,
                                      S.COMPRESSION_STRATEGY_EXTRACTIVE,
                                      S.COMPRESSION_STRATEGY_ABSTRACTIVE])  # fmt: skip
@pytest.mark.parametrize(("messages", "budget"), TABLE)
async def test_the_budget_is_never_exceeded(
    client: ContextClient, messages: list[Any], budget: int, strategy: int
) -> None:
    reply = await client.stub.Compress(compress(messages, budget, strategy=strategy))
    assert reply.tokens_before == await count(client, messages) > budget
    assert reply.tokens_after == await count(client, reply.messages) <= budget
    # The system prompt is pinned first, verbatim.
    if messages[0].role == common_pb2.ROLE_SYSTEM:
        assert reply.messages[0] == messages[0]
    # The newest turn is kept: verbatim, or cut (and said so).
    last = reply.messages[-1]
    if list(reply.truncated_messages) == [len(reply.messages) - 1]:
        assert messages[-1].content.startswith(last.content) and last.content
    else:
        assert last == messages[-1]
        assert not reply.truncated_messages
    assert reply.messages_compressed > 0 or reply.truncated_messages


async def test_a_conversation_that_fits_is_returned_unchanged(client: ContextClient) -> None:
    messages = conversation(3)
    reply = await client.stub.Compress(compress(messages, 10_000))
    assert list(reply.messages) == messages
    assert reply.strategy_used == S.COMPRESSION_STRATEGY_UNSPECIFIED
    assert reply.tokens_before == reply.tokens_after == await count(client, messages)
    assert not reply.summary and reply.messages_compressed == 0


async def test_pins_recency_and_the_summary_message(client: ContextClient) -> None:
    messages = conversation(40)
    reply = await client.stub.Compress(
        compress(messages, 400, keep_last_messages=4, strategy=S.COMPRESSION_STRATEGY_EXTRACTIVE)
    )
    assert reply.strategy_used == S.COMPRESSION_STRATEGY_EXTRACTIVE
    assert reply.messages[0] == messages[0]
    summary = reply.messages[1]
    assert summary.role == common_pb2.ROLE_SYSTEM and summary.content == reply.summary
    # Extractive summaries quote sentences of the condensed turns, with their authors.
    assert all(
        line.split(": ", 1)[0] in ("user", "assistant") for line in reply.summary.split("\n")
    )
    assert list(reply.messages[2:]) == messages[-4:]
    assert reply.messages_compressed == len(messages) - 1 - 4


async def test_keep_last_zero_keeps_only_the_summary(client: ContextClient) -> None:
    messages = conversation(20)
    reply = await client.stub.Compress(
        compress(messages, 300, keep_last_messages=0, strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)
    )
    assert [m.role for m in reply.messages] == [common_pb2.ROLE_SYSTEM] * 2
    assert reply.messages_compressed == 20


async def test_an_assistant_turn_and_its_tool_results_stay_together(
    client: ContextClient,
) -> None:
    messages = [*conversation(10)]
    messages += [
        msg("user", "What is the weather in Lisbon and Porto?"),
        msg("assistant", "Let me look both up."),
        msg("tool", "Lisbon: sunny, 21 degrees", name="weather"),
        msg("tool", "Porto: rain, 15 degrees", name="weather"),
        msg("assistant", "Lisbon is sunny; Porto is rainy."),
    ]
    for keep in range(1, 6):
        reply = await client.stub.Compress(
            compress(messages, 250, keep_last_messages=keep,
                     strategy=S.COMPRESSION_STRATEGY_TRUNCATE)
        )  # fmt: skip
        kept = [m for m in reply.messages if m.role != common_pb2.ROLE_SYSTEM]
        tools = [m for m in kept if m.role == common_pb2.ROLE_TOOL]
        # Either both tool results with the assistant turn that asked for them, or none.
        if tools:
            assert kept[0].role != common_pb2.ROLE_TOOL
            assert len(tools) == 2 and msg("assistant", "Let me look both up.") in kept


async def test_a_single_message_over_the_whole_budget_is_cut_not_dropped(
    client: ContextClient,
) -> None:
    huge = msg("user", "Ada Lovelace wrote the first program. " * 200)
    reply = await client.stub.Compress(compress([msg("system", "Be brief."), huge], 80))
    assert list(reply.truncated_messages) == [1]
    assert huge.content.startswith(reply.messages[1].content)
    assert len(reply.messages[1].content) > 50
    assert reply.tokens_after <= 80
    assert reply.strategy_used == S.COMPRESSION_STRATEGY_TRUNCATE


async def test_compress_bad_input(client: ContextClient) -> None:
    async def violation(request: S.CompressRequest) -> dict[str, str]:
        error = await error_of(client.stub.Compress(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        return field_violations(error)

    assert "messages" in await violation(compress([], 100))
    assert "token_budget" in await violation(compress(conversation(2), 0))
    assert "token_budget" in await violation(compress(conversation(2), -5))
    assert "keep_last_messages" in await violation(
        compress(conversation(2), 100, keep_last_messages=-1)
    )
    assert "strategy" in await violation(compress(conversation(2), 100, strategy=42))
    assert "summary_max_tokens" in await violation(
        compress(conversation(2), 100, summary_max_tokens=100)
    )
    bad_role = [msg("user", "hi"), common_pb2.ChatMessage(content="no role")]
    assert "messages[1].role" in await violation(compress(bad_role, 100))
    big_system = [msg("system", "Order 4471 ships to Lisbon. " * 50), *conversation(4, system="")]
    problem = (await violation(compress(big_system, 60)))["token_budget"]
    assert "system messages alone take" in problem
    error = await error_of(client.stub.Compress(compress(conversation(2), 9, tokenizer="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- summaries through the generation service --------------------------------------------


def _summary_prompts(fake: FakeOpenAI) -> list[str]:
    return [r.json["messages"][-1]["content"] for r in fake.requests_to(CHAT)]


async def test_abstractive_summary_comes_from_the_generation_service(
    client: ContextClient, summarizer_llm: FakeOpenAI
) -> None:
    summarizer_llm.reset()
    messages = conversation(30)
    reply = await client.stub.Compress(
        compress(messages, 300, summary_max_tokens=40, strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)
    )
    assert reply.strategy_used == S.COMPRESSION_STRATEGY_ABSTRACTIVE
    # Greedy and bounded by summary_max_tokens; the condensed turns are more than one chunk
    # (DAERT_CONTEXT_SUMMARY_CHUNK_TOKENS=400 here), so they are folded in chunk by chunk.
    requests = summarizer_llm.requests_to(CHAT)
    assert len(requests) >= 2
    assert all(r.json["max_tokens"] == 40 and r.json["temperature"] == 0 for r in requests)
    prompts = _summary_prompts(summarizer_llm)
    assert "Question 0: tell me about item 0." in prompts[0]
    assert "Question 0:" not in prompts[1]
    first_summary = summarizer_llm.expected_text(
        " ".join(m["content"] for m in requests[0].json["messages"]), max_tokens=40
    )
    assert first_summary.strip() in prompts[1]
    assert all(messages[-1].content not in p for p in prompts)  # kept verbatim
    assert reply.summary and reply.summary in reply.messages[1].content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


async def test_a_summary_the_server_sizes_is_at_most_a_quarter_chunk(
    client: ContextClient, summarizer_llm: FakeOpenAI
) -> None:
    summarizer_llm.reset()
    messages = conversation(60)
    reply = await client.stub.Compress(
        compress(messages, 900, keep_last_messages=4, strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)
    )
    assert reply.strategy_used == S.COMPRESSION_STRATEGY_ABSTRACTIVE
    # Far more room is left than that, but the summary so far and the next chunk must fit
    # the summary model's context together (SUMMARY_CHUNK_TOKENS=400 here).
    assert {r.json["max_tokens"] for r in summarizer_llm.requests_to(CHAT)} == {100}


async def test_rolling_summary_is_reused_and_extended(
    client: ContextClient, summarizer_llm: FakeOpenAI
) -> None:
    summarizer_llm.reset()
    messages = conversation(30)
    first = compress(messages, 300, conversation_id="trip-1", tenant="acme", keep_last_messages=4,
                     strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)  # fmt: skip
    reply = await client.stub.Compress(first)
    assert not reply.summary_reused
    cold_calls = len(_summary_prompts(summarizer_llm))

    # Two new turns: only the two that left the kept window are folded into the summary.
    grown = [*messages, msg("user", "Question 30: and the hotel?"), msg("assistant", "Booked.")]
    del first.messages[:]
    first.messages.extend(grown)
    again = await client.stub.Compress(first)
    assert again.summary_reused
    prompts = _summary_prompts(summarizer_llm)
    assert len(prompts) == cold_calls + 1  # one fold, however long the history
    assert reply.summary in prompts[-1]  # the stored summary is folded in
    assert "Question 0:" not in prompts[-1]  # and the old turns are not sent again
    assert messages[-4].content in prompts[-1] and messages[-3].content in prompts[-1]
    assert again.messages_compressed == reply.messages_compressed + 2

    # The same history once more: the stored summary answers without an LLM call.
    unchanged = await client.stub.Compress(first)
    assert unchanged.summary_reused and unchanged.summary == again.summary
    assert len(_summary_prompts(summarizer_llm)) == cold_calls + 1


async def test_an_edited_history_is_summarised_again(
    client: ContextClient, summarizer_llm: FakeOpenAI
) -> None:
    summarizer_llm.reset()
    messages = conversation(30)
    request = compress(messages, 300, conversation_id="trip-2", keep_last_messages=4,
                       strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)  # fmt: skip
    await client.stub.Compress(request)
    cold_calls = len(_summary_prompts(summarizer_llm))
    request.messages[3].content = "Answer 2: actually, item 2 was cancelled."
    reply = await client.stub.Compress(request)
    assert not reply.summary_reused
    again = _summary_prompts(summarizer_llm)[cold_calls:]
    assert len(again) == cold_calls  # the whole history once more
    assert "item 2 was cancelled" in again[0]


async def test_tenants_and_deletion(client: ContextClient, summarizer_llm: FakeOpenAI) -> None:
    messages = conversation(30)

    def request(tenant: str) -> S.CompressRequest:
        return compress(messages, 300, conversation_id="shared-id", tenant=tenant,
                        strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)  # fmt: skip

    await client.stub.Compress(request("tenant-a"))
    assert not (await client.stub.Compress(request("tenant-b"))).summary_reused
    assert (await client.stub.Compress(request("tenant-a"))).summary_reused

    delete = S.DeleteConversationRequest(conversation_id="shared-id", tenant="tenant-a")
    assert (await client.stub.DeleteConversation(delete)).deleted
    assert not (await client.stub.DeleteConversation(delete)).deleted
    assert not (await client.stub.Compress(request("tenant-a"))).summary_reused
    assert (await client.stub.Compress(request("tenant-b"))).summary_reused

    error = await error_of(client.stub.DeleteConversation(S.DeleteConversationRequest()))
    assert "conversation_id" in field_violations(error)


async def test_redis_down_still_answers_statelessly(
    client: ContextClient, context_server: ServerProcess, redis_server: EmbeddedRedis
) -> None:
    request = compress(conversation(30), 300, conversation_id="while-down",
                       strategy=S.COMPRESSION_STRATEGY_EXTRACTIVE)  # fmt: skip
    before = metric(context_server.metrics_port, "daert_redis_errors_total",
                    service="context", operation="summary_get")  # fmt: skip
    redis_server.stop()
    try:
        reply = await client.stub.Compress(request)
        assert reply.tokens_after <= 300 and reply.summary and not reply.summary_reused
        after = metric(context_server.metrics_port, "daert_redis_errors_total",
                       service="context", operation="summary_get")  # fmt: skip
        assert after > before
        error = await error_of(
            client.stub.DeleteConversation(S.DeleteConversationRequest(conversation_id="x"))
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        redis_server.start()


# --- when the generation service is down --------------------------------------------------


async def test_generation_down(context_without_llm: ServerProcess) -> None:
    async with ContextClient(context_without_llm.target, max_attempts=1) as client:
        messages = conversation(30)
        abstractive = compress(messages, 300, strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE)
        # A deadline far above what failing takes: the call must fail, not wait it out.
        error = await error_of(client.stub.Compress(abstractive, timeout=20))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "abstractive summaries" in (error.details() or "")

        reply = await client.stub.Compress(compress(messages, 300), timeout=20)  # AUTO
        assert reply.strategy_used == S.COMPRESSION_STRATEGY_EXTRACTIVE
        assert "ABSTRACTIVE" in reply.fallback_reason
        assert reply.summary and reply.tokens_after <= 300
