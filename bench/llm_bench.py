"""The embedded LLM for real: time to first token and tokens/s of Gemma 3 270M on llama.cpp's
llama-server, read straight from the server's OpenAI-compatible stream vs relayed through
the generation service, side by side in one run (rounds interleaved; medians, as the machine
is shared and noisy). Tokens are the server's own count (usage), not words.

    make bench            # or: python bench/llm_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from daert.clients import GenerationClient
from daert.local.llm import MODEL_NAME, EmbeddedLlm, LlmSettings, generation_models
from daert.testing import ServerProcess
from daert.v1 import common_pb2, generation_pb2
from httpx_sse import aconnect_sse

from tests.helpers import free_port

PROMPT = "Write a long story about a lighthouse keeper and the sea."
REPLY_TOKENS = 128


async def direct(http: httpx.AsyncClient) -> tuple[float, float]:
    """(TTFT s, tokens/s after the first) reading llama-server's SSE stream ourselves."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, completion = 0.0, 0
    async with aconnect_sse(http, "POST", "/v1/chat/completions", json=body) as sse:
        async for event in sse.aiter_sse():
            if event.data == "[DONE]":
                continue
            chunk = event.json()
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                first = first or time.perf_counter()
            completion = (chunk.get("usage") or {}).get("completion_tokens", completion)
    return first - started, (completion - 1) / (time.perf_counter() - first)


async def relayed(client: GenerationClient) -> tuple[float, float]:
    """The same request through the generation service."""
    request = generation_pb2.GenerateStreamRequest(
        model=MODEL_NAME,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=PROMPT)],
        params=generation_pb2.SamplingParams(temperature=0, max_tokens=REPLY_TOKENS),
        cache_policy=generation_pb2.CACHE_POLICY_BYPASS,
    )
    started = time.perf_counter()
    first, completion = 0.0, 0
    async for message in client.stub.GenerateStream(request):
        if message.delta:
            first = first or time.perf_counter()
        completion = message.usage.completion_tokens or completion
    return first - started, (completion - 1) / (time.perf_counter() - first)


async def main(rounds: int) -> None:
    llm = EmbeddedLlm(
        LlmSettings(port=free_port(), context_size=2048, parallel=1),
        Path(tempfile.mkdtemp(prefix="llm-bench-")),
    )
    print("starting llama-server with Gemma 3 270M", flush=True)
    llm.start()
    ttft: dict[str, list[float]] = {"direct": [], "relayed": []}
    rate: dict[str, list[float]] = {"direct": [], "relayed": []}
    try:
        env = {"DAERT_GENERATION_MODELS": generation_models(llm.url, 2048)}
        with ServerProcess("generation", env) as server:
            server.wait_health("SERVING", 60)
            async with (
                httpx.AsyncClient(base_url=llm.url, timeout=120) as http,
                GenerationClient(server.target, timeout_s=300) as client,
            ):
                await direct(http)  # warm: the prompt is cached by the server after this
                await relayed(client)
                for r in range(rounds):
                    for path in ("direct", "relayed"):
                        seconds, per_s = await (
                            direct(http) if path == "direct" else relayed(client)
                        )
                        ttft[path].append(seconds)
                        rate[path].append(per_s)
                    print(f"round {r + 1}/{rounds} done", flush=True)
    finally:
        llm.stop()

    print(
        f"\nembedded LLM (Gemma 3 270M Q4_K_M, llama-server, {os.cpu_count()} cores): "
        f"{rounds} streams of {REPLY_TOKENS} tokens per path, interleaved"
    )
    print(f"  {'path':<10} {'TTFT p50 ms':>12} {'tokens/s p50':>14}")
    for path in ("direct", "relayed"):
        print(
            f"  {path:<10} {statistics.median(ttft[path]) * 1e3:12.1f} "
            f"{statistics.median(rate[path]):14.1f}"
        )
    ratio = statistics.median(rate["relayed"]) / statistics.median(rate["direct"])
    added = (statistics.median(ttft["relayed"]) - statistics.median(ttft["direct"])) * 1e3
    print(f"  relayed/direct tokens/s: {ratio:.3f}   added TTFT p50: {added:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    asyncio.run(main(parser.parse_args().rounds))
