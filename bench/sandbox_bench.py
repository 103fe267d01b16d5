"""Sandbox latency: `print(1)` through the gRPC API from a warm pool and from a cold start
(pool size 0), measured in the same run, and calls/s with 8 concurrent callers.

    make bench            # or: python bench/sandbox_bench.py --calls 60
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from daert.clients import SandboxClient
from daert.testing import ServerProcess
from daert.v1 import sandbox_pb2

REQUEST = sandbox_pb2.ExecuteRequest(code="print(1)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latencies(client: SandboxClient, calls: int, pause_s: float) -> list[float]:
    """Sequential calls; the pause lets a warm pool refill, as between a user's requests."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        reply = await client.stub.Execute(REQUEST)
        samples.append((time.perf_counter() - started) * 1000)
        assert reply.stdout == "1\n", reply
        await asyncio.sleep(pause_s)
    return samples


async def throughput(client: SandboxClient, calls: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await client.stub.Execute(REQUEST)

    started = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return (calls // concurrency) * concurrency / (time.perf_counter() - started)


async def main(calls: int) -> None:
    env = {"DAERT_SANDBOX_MAX_CONCURRENT": "16", "DAERT_SANDBOX_POOL_SIZE": "8"}
    with (
        ServerProcess("sandbox", env) as warm_server,
        ServerProcess("sandbox", {**env, "DAERT_SANDBOX_POOL_SIZE": "0"}) as cold_server,
    ):
        warm_server.wait_health("SERVING", timeout_s=60)
        cold_server.wait_health("SERVING", timeout_s=60)
        async with (
            SandboxClient(warm_server.target, timeout_s=60) as warm,
            SandboxClient(cold_server.target, timeout_s=60) as cold,
        ):
            await latencies(warm, 3, 0.3)  # warm-up
            warm_ms, cold_ms = [], []
            for _ in range(3):  # interleave, so both see the same machine
                warm_ms += await latencies(warm, calls // 3, 0.3)
                cold_ms += await latencies(cold, calls // 3, 0.0)
            rate = await throughput(warm, 8 * 12, 8)

    print(f"\nsandbox print(1) latency through gRPC, ms ({len(warm_ms)} calls each)")
    for name, values in (("warm pool", warm_ms), ("cold start", cold_ms)):
        print(
            f"  {name:<11} p50 {statistics.median(values):7.1f}   p95 "
            f"{percentile(values, 0.95):7.1f}"
        )
    print(
        f"  cold / warm p50: {statistics.median(cold_ms) / statistics.median(warm_ms):.1f}x"
        "   (goal: warm p50 <= 50 ms)"
    )
    print(f"  8 concurrent callers: {rate:.1f} calls/s (each call gets a fresh sandbox)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60)
    asyncio.run(main(parser.parse_args().calls))
