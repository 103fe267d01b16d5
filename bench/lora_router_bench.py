"""LoRA routing: adapter loads (cold starts) and replica balance for the router's adapter-affinity
placement against round-robin and random, on the same request streams; then routes/s through
the Route RPC.

Workload: Zipf(1.1) over 100 adapters, 4 replicas x 8 adapter slots. Simulated time: one
request arrives per time unit and holds its replica for an exponential service time whose
mean is the mean number of requests in flight (default 32, i.e. 8 per replica); releases are
applied as the clock passes their end. Affinity runs the router's own placement (the
PlacementState class and its Lua script) against a real Redis started here, with the
service's default policy and, for comparison, with plain LRU eviction. Round-robin and random
count loads with a per-replica LRU of the same size. "Load" balance is requests per replica
(max/mean); the time-averaged in-flight per replica is printed next to it.

    make bench            # or: python bench/lora_router_bench.py --streams 3 --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import http.server
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daert.clients import LoraRouterClient
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.lora.config import LoraSettings
from daert.lora.placement import PlacementState, Policy, Slot
from daert.runtime.redis_state import RedisState
from daert.testing import ServerProcess
from daert.v1 import lora_pb2

ADAPTERS = 100
ZIPF_S = 1.1
REPLICAS = 4
SLOTS = 8
BASE = "base-model"
DEFAULTS = LoraSettings.model_fields


@dataclass(frozen=True)
class Request:
    arrival: float
    adapter: str
    service: float  # how long it holds its replica


@dataclass
class Outcome:
    loads: int
    per_replica: list[int]  # requests
    busy: list[float]  # time-averaged requests in flight
    spills: int = 0

    def balance(self) -> float:
        return max(self.per_replica) / statistics.mean(self.per_replica)

    def busy_balance(self) -> float:
        return max(self.busy) / statistics.mean(self.busy)


def make_stream(n: int, mean_in_flight: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    weights = [rank**-ZIPF_S for rank in range(1, ADAPTERS + 1)]
    names = [f"adapter-{i:03d}" for i in range(ADAPTERS)]
    picks = rng.choices(names, weights=weights, k=n)
    return [
        Request(float(i + 1), name, rng.expovariate(1 / mean_in_flight))
        for i, name in enumerate(picks)
    ]


def time_averaged(stream: list[Request], replica_of: list[int]) -> list[float]:
    """Mean requests in flight per replica over the stream's span."""
    horizon = stream[-1].arrival
    busy = [0.0] * REPLICAS
    for request, replica in zip(stream, replica_of, strict=True):
        busy[replica] += min(request.service, horizon - request.arrival)
    return [b / horizon for b in busy]


def static_optimum(stream: list[Request]) -> int:
    """Loads with the REPLICAS x SLOTS most requested adapters loaded once and kept: every
    request for any other adapter is a cold start (a bound for comparison, not a policy)."""
    counts = Counter(r.adapter for r in stream)
    kept = {name for name, _ in counts.most_common(REPLICAS * SLOTS)}
    return len(kept) + sum(1 for r in stream if r.adapter not in kept)


def baseline(stream: list[Request], replica_of: list[int]) -> Outcome:
    """A placement that ignores residency (request i goes to replica_of[i]), counting loads
    with a per-replica LRU."""
    resident = [OrderedDict[str, None]() for _ in range(REPLICAS)]
    loads = 0
    for request, replica in zip(stream, replica_of, strict=True):
        lru = resident[replica]
        if request.adapter in lru:
            lru.move_to_end(request.adapter)
        else:
            loads += 1
            lru[request.adapter] = None
            if len(lru) > SLOTS:
                lru.popitem(last=False)
    per_replica = [replica_of.count(r) for r in range(REPLICAS)]
    return Outcome(loads, per_replica, time_averaged(stream, replica_of))


async def affinity(stream: list[Request], redis: RedisState, policy: Policy) -> Outcome:
    """The router's placement in Redis, driven by the simulated clock."""
    now = 0.0
    state = PlacementState(
        redis, policy, key_prefix=f"bench-{random.getrandbits(64):x}:", clock=lambda: now
    )
    slots = [Slot(f"replica-{r}", SLOTS) for r in range(REPLICAS)]
    index = {slot.name: r for r, slot in enumerate(slots)}
    ends: list[tuple[float, str]] = []
    loads = spills = 0
    replica_of = []
    for request in stream:
        while ends and ends[0][0] <= request.arrival:
            now, route_id = heapq.heappop(ends)
            await state.release(route_id)
        now = request.arrival
        placed = await state.place(slots, request.adapter)
        loads += placed.loaded
        spills += placed.spilled
        replica_of.append(index[placed.replica])
        heapq.heappush(ends, (request.arrival + request.service, placed.route_id))
    per_replica = [replica_of.count(r) for r in range(REPLICAS)]
    return Outcome(loads, per_replica, time_averaged(stream, replica_of), spills)


def default_policy(popularity_half_life: int) -> Policy:
    return Policy(
        spill_factor=DEFAULTS["spill_factor"].default,
        spill_margin=DEFAULTS["spill_margin"].default,
        popularity_half_life=popularity_half_life,
        lease_s=1e9,  # the simulation releases every route itself
    )


@contextmanager
def health_endpoint() -> Iterator[str]:
    """An HTTP server answering 200 on /health: the replicas' probe target (the router
    makes no other call to LoRAX replicas)."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


async def route_rate(
    client: LoraRouterClient, names: list[str], concurrency: int
) -> tuple[float, float]:
    """(Route calls/s, Route+ReleaseRoute pairs/s) for `names`, `concurrency` callers."""

    async def routes(mine: list[str], release: bool) -> None:
        for name in mine:
            reply = await client.stub.Route(lora_pb2.RouteRequest(adapter=name))
            if release:
                await client.stub.ReleaseRoute(
                    lora_pb2.ReleaseRouteRequest(route_id=reply.route_id)
                )

    rates = []
    for release in (False, True):
        started = time.perf_counter()
        await asyncio.gather(*(routes(names[i::concurrency], release) for i in range(concurrency)))
        rates.append(len(names) / (time.perf_counter() - started))
    return rates[0], rates[1]


async def rpc_rates(
    folder: Path, redis_url: str, n_routes: int, rounds: int
) -> list[tuple[float, float]]:
    postgres = EmbeddedPostgres(folder / "pgdata")
    dsn = postgres.start()
    try:
        with health_endpoint() as url:
            replicas = [
                {"name": f"replica-{r}", "url": url, "kind": "lorax", "base_model": BASE,
                 "max_resident_adapters": SLOTS}
                for r in range(REPLICAS)
            ]  # fmt: skip
            env = {
                "DAERT_LORA_DSN": dsn,
                "DAERT_LORA_REDIS_URL": redis_url,
                "DAERT_LORA_REPLICAS": json.dumps(replicas),
            }
            with ServerProcess("lora", env) as server:
                server.wait_health("SERVING")
                async with LoraRouterClient(server.target) as client:
                    for i in range(ADAPTERS):
                        await client.stub.RegisterAdapter(
                            lora_pb2.RegisterAdapterRequest(
                                adapter=lora_pb2.Adapter(
                                    name=f"adapter-{i:03d}",
                                    source=f"/adapters/{i:03d}",
                                    base_model=BASE,
                                )
                            )
                        )
                    names = [r.adapter for r in make_stream(n_routes, 32, seed=99)]
                    await route_rate(client, names[:200], 8)  # warm-up
                    return [await route_rate(client, names, 8) for _ in range(rounds)]
    finally:
        postgres.stop()


async def main(
    streams: int, n_requests: int, mean_in_flight: float, rounds: int, routes: int
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    redis_server = EmbeddedRedis(folder / "redis")
    redis_server.start()
    redis = RedisState("lora-bench", redis_server.url, None, 5.0)
    half_life = DEFAULTS["popularity_half_life"].default
    policies = {
        f"affinity (router default, popularity half-life {half_life})": default_policy(half_life),
        "affinity, LRU eviction (half-life 0)": default_policy(0),
    }
    labels = [*policies, "round-robin", "random"]
    results: dict[str, list[Outcome]] = {label: [] for label in labels}
    optimum = []
    try:
        for seed in range(1, streams + 1):
            stream = make_stream(n_requests, mean_in_flight, seed)
            for label, policy in policies.items():
                results[label].append(await affinity(stream, redis, policy))
            round_robin = [i % REPLICAS for i in range(len(stream))]
            results["round-robin"].append(baseline(stream, round_robin))
            rng = random.Random(seed)
            results["random"].append(baseline(stream, [rng.randrange(REPLICAS) for _ in stream]))
            optimum.append(static_optimum(stream))
            print(f"stream {seed}/{streams} done", flush=True)
        print("measuring routes/s through the Route RPC ...", flush=True)
        rates = await rpc_rates(folder, redis_server.url, routes, rounds)
    finally:
        await redis.close()
        redis_server.stop()

    print(
        f"\nLoRA placement: Zipf({ZIPF_S}) over {ADAPTERS} adapters, {REPLICAS} replicas x {SLOTS} "
        f"slots, {n_requests} requests per stream, {streams} streams, mean {mean_in_flight:g} "
        f"requests in flight; medians over the streams [per stream]"
    )
    print(
        f"  {'policy':<58} {'loads':>7} {'per req':>8} {'max/mean req':>13} "
        f"{'max/mean in-flight':>19} {'spills':>7}"
    )
    for label in labels:
        outcomes = results[label]
        loads = statistics.median(o.loads for o in outcomes)
        print(
            f"  {label:<58} {loads:7.0f} {loads / n_requests:8.3f} "
            f"{statistics.median(o.balance() for o in outcomes):13.3f} "
            f"{statistics.median(o.busy_balance() for o in outcomes):19.3f} "
            f"{statistics.median(o.spills for o in outcomes):7.0f}"
        )
    print(
        f"  {'(bound: the 32 most requested adapters kept loaded)':<58} "
        f"{statistics.median(optimum):7.0f} {statistics.median(optimum) / n_requests:8.3f}"
    )
    rr = results["round-robin"]
    for label in policies:
        ratios = [b.loads / a.loads for a, b in zip(results[label], rr, strict=True)]
        per_stream = ", ".join(f"{r:.2f}" for r in ratios)
        print(
            f"  loads(round-robin) / loads({label}): {statistics.median(ratios):.2f} [{per_stream}]"
        )
    bound = [b.loads / o for o, b in zip(optimum, rr, strict=True)]
    print(f"  loads(round-robin) / bound: {statistics.median(bound):.2f}")
    best = results[labels[0]]
    met_ratio = statistics.median(b.loads / a.loads for a, b in zip(best, rr, strict=True)) >= 3
    balances = [o.balance() for o in best]
    met_balance = statistics.median(balances) <= 1.25
    print(
        f"  goals for the router default (medians): >= 3x fewer loads than round-robin: "
        f"{'met' if met_ratio else 'NOT met'}; max/mean requests per replica <= 1.25: "
        f"{'met' if met_balance else 'NOT met'} [{', '.join(f'{b:.3f}' for b in balances)}]"
    )
    route_only = statistics.median(r[0] for r in rates)
    with_release = statistics.median(r[1] for r in rates)
    print(
        f"\nRoute RPC throughput (one router process with Redis and PostgreSQL, 8 concurrent "
        f"callers, {routes} explicit routes per round, median of {rounds} rounds, "
        f"{os.cpu_count()} cores):\n"
        f"  Route calls/s: {route_only:.0f}   [{', '.join(f'{r[0]:.0f}' for r in rates)}]\n"
        f"  Route + ReleaseRoute pairs/s: {with_release:.0f}   "
        f"[{', '.join(f'{r[1]:.0f}' for r in rates)}]"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=3, help="request streams (seeds)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per stream")
    parser.add_argument("--in-flight", type=float, default=32, help="mean requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="Route RPC rounds")
    parser.add_argument("--routes", type=int, default=1000, help="Route calls per round")
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.requests, args.in_flight, args.rounds, args.routes))
