"""Generation proxy overhead: time to first token and tokens/s of one stream read straight
from a fake vLLM server vs relayed through the generation service, side by side in one run
(rounds interleaved; medians, as the machine is shared and noisy). Then the latency of a
cache hit (Redis) against the same request uncached.

The fake server runs in a process of its own and answers at once (no model); whatever it
costs is paid by both paths, so the difference is the proxy's: gRPC, parsing the SSE
stream, and one message per token.

    make bench            # or: PYTHONPATH=. python bench/generation_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from daert.clients import GenerationClient
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, generation_pb2
from httpx_sse import aconnect_sse

LONG_REPLY = 2000  # tokens: for tokens/s
SHORT_REPLY = 16  # tokens: for time to first token (the fake prepares a reply up front)


def serve_fake(urls: Any, stop: Any) -> None:
    """The fake vLLM server, in its own process (the bench's event loop must not slow it).
    A prompt starting with "long" gets LONG_REPLY tokens, any other SHORT_REPLY."""
    from tests.fakes.openai import FakeOpenAI

    with FakeOpenAI(models=["bench-model"]) as fake:
        fake.reply_fn = lambda prompt: [
            f" t{i}" for i in range(LONG_REPLY if prompt.startswith("long") else SHORT_REPLY)
        ]
        urls.put(fake.url)
        stop.wait()


def chat_body(prompt: str) -> dict[str, Any]:
    return {
        "model": "bench-model",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }


async def direct(http: httpx.AsyncClient, prompt: str) -> tuple[float, float]:
    """(TTFT s, tokens/s) reading the server's SSE stream ourselves."""
    started = time.perf_counter()
    first = 0.0
    text = []
    async with aconnect_sse(http, "POST", "/v1/chat/completions", json=chat_body(prompt)) as sse:
        async for event in sse.aiter_sse():
            if event.data == "[DONE]":
                continue  # to the end of the body, so the connection is reused
            for choice in json.loads(event.data).get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    text.append(content)
                    first = first or time.perf_counter()
    done = time.perf_counter()
    return first - started, tokens(text) / (done - first)


def tokens(text: list[str]) -> int:
    """The fake's tokens are " t<i>": one per word, however the deltas were cut."""
    return len("".join(text).split())


async def relayed(client: GenerationClient, prompt: str) -> tuple[float, float]:
    """(TTFT s, tokens/s) through the generation service; a message may carry several
    tokens (those that piled up while the previous message was being sent)."""
    request = generation_pb2.GenerateStreamRequest(
        model="bench",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        params=generation_pb2.SamplingParams(temperature=0),
        cache_policy=generation_pb2.CACHE_POLICY_BYPASS,
    )
    started = time.perf_counter()
    first = 0.0
    text = []
    async for message in client.stub.GenerateStream(request):
        if message.delta:
            text.append(message.delta)
            first = first or time.perf_counter()
    done = time.perf_counter()
    return first - started, tokens(text) / (done - first)


async def unary_latency(client: GenerationClient, request: Any) -> float:
    started = time.perf_counter()
    await client.stub.Generate(request)
    return time.perf_counter() - started


async def main(rounds: int, streams: int, ttft_calls: int, cache_calls: int) -> None:
    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    fake = context.Process(target=serve_fake, args=(urls, stop), daemon=True)
    fake.start()
    url = urls.get(timeout=30)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="generation-bench-")))
    env = {
        "DAERT_GENERATION_MODELS": json.dumps(
            [{"name": "bench", "backend": "openai", "url": url, "upstream_model": "bench-model"}]
        ),
        "DAERT_GENERATION_REDIS_URL": redis.start(),
    }
    ttft: dict[str, list[float]] = {"direct": [], "relayed": []}
    rate: dict[str, list[float]] = {"direct": [], "relayed": []}
    try:
        with ServerProcess("generation", env) as server:
            server.wait_health("SERVING", 30)
            async with (
                httpx.AsyncClient(base_url=url, timeout=60) as http,
                GenerationClient(server.target, timeout_s=120) as client,
            ):
                await direct(http, "warm up")
                await relayed(client, "warm up")
                for r in range(rounds):
                    for i in range(streams):
                        for path, measure in (("direct", direct), ("relayed", relayed)):
                            handle: Any = http if path == "direct" else client
                            rate[path].append((await measure(handle, f"long {r} {i}"))[1])
                        for j in range(ttft_calls):
                            for path, measure in (("direct", direct), ("relayed", relayed)):
                                handle = http if path == "direct" else client
                                ttft[path].append((await measure(handle, f"short {i} {j}"))[0])
                    print(f"round {r + 1}/{rounds} done", flush=True)

                # Cache: one request stored, then hit; the same request bypassing the cache
                # (a short answer, so the upstream's share is small) for comparison.
                fake_short = generation_pb2.SamplingParams(temperature=0, max_tokens=16)
                cached = generation_pb2.GenerateRequest(
                    model="bench",
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hit")],
                    params=fake_short,
                )
                uncached = generation_pb2.GenerateRequest()
                uncached.CopyFrom(cached)
                uncached.cache_policy = generation_pb2.CACHE_POLICY_BYPASS
                await client.stub.Generate(cached)
                hits, misses = [], []
                for _ in range(cache_calls):
                    hits.append(await unary_latency(client, cached))
                    misses.append(await unary_latency(client, uncached))
    finally:
        stop.set()
        fake.join(timeout=10)
        redis.stop()

    def p50_ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    n = rounds * streams
    print(
        f"\ngeneration proxy, per path, interleaved: {n} streams of {LONG_REPLY} tokens "
        f"(tokens/s) and {n * ttft_calls} of {SHORT_REPLY} (TTFT) ({os.cpu_count()} cores; the "
        "fake vLLM server in its own process)"
    )
    print(f"  {'path':<10} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'tokens/s p50':>14}")
    for path in ("direct", "relayed"):
        p95 = statistics.quantiles(ttft[path], n=20)[-1] * 1e3
        print(
            f"  {path:<10} {p50_ms(ttft[path]):12.2f} {p95:12.2f} "
            f"{statistics.median(rate[path]):14.0f}"
        )
    added = p50_ms(ttft["relayed"]) - p50_ms(ttft["direct"])
    print(f"  added TTFT p50: {added:.2f} ms   (goal <= 2 ms)")
    print(
        f"  relayed tokens/s per stream: {statistics.median(rate['relayed']):.0f}   (goal >= 5000)"
    )
    print(f"\nresponse cache, {cache_calls} unary calls each (16-token answer)")
    print(
        f"  cache hit p50: {p50_ms(hits):.2f} ms   uncached (bypass) p50: {p50_ms(misses):.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10, help="long streams per path per round")
    parser.add_argument("--ttft-calls", type=int, default=10, help="short ones per long one")
    parser.add_argument("--cache-calls", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.streams, args.ttft_calls, args.cache_calls))
