"""The OpenAI-compatible gateway, in one run:

1. Overhead: time to first token and tokens/s of a chat stream read through the gateway
   (SSE over HTTP with httpx + httpx-sse, parsing each chunk's JSON as the openai SDK's
   stream does) vs the same stream read straight from the generation service over gRPC
   (GenerateStream), interleaved request by request, against a fake vLLM server that paces
   its tokens (a fixed per-token delay, a fixed reply length); then embeddings requests/s
   through the gateway vs gRPC Embed at a fixed concurrency. Medians: the machine is shared.
2. Soak: the `make up` stack itself (`daert up` as a subprocess, the fake as its LLM server,
   Airflow off), 50 concurrent clients mixing chat (unary and streamed), embeddings and RAG
   chat through the gateway with the development key; then the same while Redis is killed
   (SIGKILL) and restarted and PostgreSQL restarted once (pg_ctl restart -m fast). Every
   failed request is counted and grouped by cause, with when it happened.

    make bench      # or: PYTHONPATH=. python bench/gateway_bench.py --only soak --soak-seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from daert.clients import EmbeddingClient, GenerationClient, RetrievalClient
from daert.gateway.keys import KeyStore
from daert.local.child import free_port
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.runtime.registry import SERVICES
from daert.testing import ServerProcess
from daert.v1 import common_pb2, embedding_pb2, generation_pb2, retrieval_pb2
from google.protobuf import struct_pb2
from httpx_sse import aconnect_sse

MODEL = "bench"  # the generation model's name, in front of the fake's "bench-model"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the embedding service's default
NO_SERVICE = "127.0.0.1:9"  # nothing listens: services the overhead part leaves out

# Overhead: a paced stream, so tokens/s measures whether the gateway keeps up with it.
REPLY_TOKENS = 64
TOKEN_DELAY_S = 0.005
EMBED_CONCURRENCY = 8

# Soak: short replies, so the 50 clients make many requests.
SOAK_CLIENTS = 50
SOAK_REPLY_TOKENS = 16
SOAK_TOKEN_DELAY_S = 0.002
KINDS = ("chat", "stream", "embed", "rag")
COLLECTION = "bench_handbook"
QUESTIONS = [
    "How often must the Helix-9 coolant pump be inspected?",
    "Which seal kit replaces worn Helix-9 pump seals?",
    "When does the Lisbon office open?",
    "What does the cafeteria serve on Thursdays?",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve_fake(urls: Any, stop: Any, reply_tokens: int, token_delay_s: float) -> None:
    """The fake vLLM server in a process of its own (the bench's clients must not slow it)."""
    from tests.fakes.openai import FakeOpenAI

    with FakeOpenAI(models=["bench-model"], max_model_len=8192, parallel=64) as fake:
        fake.reply_tokens = [f" t{i}" for i in range(reply_tokens)]
        fake.token_delay_s = token_delay_s
        urls.put(fake.url)
        stop.wait()


@dataclass
class Fake:
    reply_tokens: int
    token_delay_s: float
    url: str = ""
    _stop: Any = None
    _process: Any = None

    def __enter__(self) -> Fake:
        context = multiprocessing.get_context("spawn")
        urls, self._stop = context.Queue(), context.Event()
        args = (urls, self._stop, self.reply_tokens, self.token_delay_s)
        self._process = context.Process(target=serve_fake, args=args, daemon=True)
        self._process.start()
        self.url = urls.get(timeout=60)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._process.join(timeout=10)


def generation_models(url: str) -> str:
    return json.dumps(
        [
            {
                "name": MODEL,
                "backend": "openai",
                "url": url,
                "upstream_model": "bench-model",
                "context_length": 8192,
            }
        ]
    )


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def p99_ms(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] * 1e3 if values else float("nan")
    return statistics.quantiles(values, n=100)[98] * 1e3


def words(text: list[str]) -> int:
    """The fake's tokens are " t<i>": one per word, however the deltas were cut."""
    return len("".join(text).split())


# ---------------------------------------------------------------------------- overhead
async def through_gateway(http: httpx.AsyncClient, prompt: str) -> tuple[float, float]:
    """(TTFT s, tokens/s) of one streamed chat completion through the gateway."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
    }
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async with aconnect_sse(http, "POST", "/v1/chat/completions", json=body) as sse:
        sse.response.raise_for_status()
        async for event in sse.aiter_sse():
            if event.data == "[DONE]":
                continue  # read to the end of the body, so the connection is reused
            for choice in json.loads(event.data).get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    text.append(content)
                    first = first or time.perf_counter()
    done = time.perf_counter()
    assert words(text) == REPLY_TOKENS, words(text)
    return first - started, (REPLY_TOKENS - 1) / (done - first)


async def through_grpc(client: GenerationClient, prompt: str) -> tuple[float, float]:
    """(TTFT s, tokens/s) of the same stream read from the generation service directly."""
    request = generation_pb2.GenerateStreamRequest(
        model=MODEL,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        params=generation_pb2.SamplingParams(temperature=0),
    )
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async for message in client.stub.GenerateStream(request):
        if message.delta:
            text.append(message.delta)
            first = first or time.perf_counter()
    done = time.perf_counter()
    assert words(text) == REPLY_TOKENS, words(text)
    return first - started, (REPLY_TOKENS - 1) / (done - first)


async def embed_rate(call: Any, requests: int) -> float:
    """Requests/s of `requests` one-text calls made by EMBED_CONCURRENCY callers."""
    todo = iter(range(requests))

    async def caller() -> None:
        for n in todo:
            await call(f"the gateway forwards embedding request {n} of the bench")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(EMBED_CONCURRENCY)))
    return requests / (time.perf_counter() - started)


async def create_key(dsn: str, tenant: str) -> str:
    store = KeyStore(dsn)
    await store.open()
    try:
        token, _ = await store.create(tenant=tenant, name="gateway bench")
    finally:
        await store.close()
    return token


async def wait_ready(url: str, timeout_s: float, alive: Any = None) -> None:
    """Until the gateway's /readyz answers 200 (its key store and required services)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if alive is not None and not alive():
                raise RuntimeError("the stack exited before the gateway was ready")
            try:
                reply = await http.get(f"{url}/readyz")
                if reply.status_code == 200:
                    return
                last = reply.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready after {timeout_s:g} s: {last}")
            await asyncio.sleep(0.5)


async def overhead(streams: int, embed_rounds: int, embed_requests: int) -> None:
    with ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        fake = stack.enter_context(Fake(REPLY_TOKENS, TOKEN_DELAY_S))
        log("overhead: starting PostgreSQL (keys), generation, embedding, LoRA router, gateway")
        postgres = EmbeddedPostgres(state / "pgdata")
        dsn = postgres.start()
        stack.callback(postgres.stop)
        token = await create_key(dsn, "bench")
        generation = stack.enter_context(
            ServerProcess("generation", {"DAERT_GENERATION_MODELS": generation_models(fake.url)})
        )
        embedding = stack.enter_context(ServerProcess("embedding"))
        # The catalog asks the LoRA router for adapters every few seconds: a dead address
        # would cost each refresh the clients' UNAVAILABLE retries, as no real stack does.
        lora = stack.enter_context(ServerProcess("lora", {"DAERT_LORA_DSN": dsn}))
        for server in (generation, embedding):
            server.wait_health("SERVING", 300)
        gateway_env = {
            "DAERT_GATEWAY_DSN": dsn,
            "DAERT_GATEWAY_REDIS_URL": "",  # no limits: the development key has none either
            "DAERT_GENERATION_TARGET": generation.target,
            "DAERT_EMBEDDING_TARGET": embedding.target,
            "DAERT_LORA_TARGET": lora.target,
            **{f"DAERT_{name}_TARGET": NO_SERVICE for name in ("CONTEXT", "RETRIEVAL", "RERANK")},
        }
        gateway = stack.enter_context(ServerProcess("gateway", gateway_env))
        await wait_ready(gateway.url, 60)

        ttft: dict[str, list[float]] = {"gateway": [], "grpc": []}
        rate: dict[str, list[float]] = {"gateway": [], "grpc": []}
        emb: dict[str, list[float]] = {"gateway": [], "grpc": []}
        async with (
            httpx.AsyncClient(
                base_url=gateway.url,
                headers={"authorization": f"Bearer {token}"},
                timeout=60,
                limits=httpx.Limits(max_connections=EMBED_CONCURRENCY * 2),
            ) as http,
            GenerationClient(generation.target, timeout_s=60) as gen,
            EmbeddingClient(embedding.target, timeout_s=60) as embed,
        ):

            async def gateway_embed(text: str) -> None:
                reply = await http.post(
                    "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": text}
                )
                reply.raise_for_status()
                reply.json()

            async def grpc_embed(text: str) -> None:
                await embed.stub.Embed(
                    embedding_pb2.EmbedRequest(
                        inputs=[text],
                        model=EMBEDDING_MODEL,
                        input_type=embedding_pb2.INPUT_TYPE_DOCUMENT,
                    )
                )

            for _ in range(3):  # warm both paths (connections, the catalog, the model)
                await through_gateway(http, "warm up")
                await through_grpc(gen, "warm up")
                await embed_rate(gateway_embed, EMBED_CONCURRENCY)
                await embed_rate(grpc_embed, EMBED_CONCURRENCY)
            log(f"overhead: {streams} streams per path, interleaved")
            for i in range(streams):
                # Alternate which path goes first, so neither always follows the other.
                order = ("gateway", "grpc") if i % 2 == 0 else ("grpc", "gateway")
                for path in order:
                    prompt = f"stream {i}"
                    measured = await (
                        through_gateway(http, prompt)
                        if path == "gateway"
                        else through_grpc(gen, prompt)
                    )
                    ttft[path].append(measured[0])
                    rate[path].append(measured[1])
            log(f"overhead: embeddings, {embed_rounds} rounds of {embed_requests} per path")
            for r in range(embed_rounds):
                order = ("gateway", "grpc") if r % 2 == 0 else ("grpc", "gateway")
                for path in order:
                    call = gateway_embed if path == "gateway" else grpc_embed
                    emb[path].append(await embed_rate(call, embed_requests))

    print(
        f"\ngateway overhead, interleaved request by request ({os.cpu_count()} cores, shared; "
        f"the fake vLLM server in its own process, {REPLY_TOKENS}-token replies paced at "
        f"{TOKEN_DELAY_S * 1e3:g} ms a token)"
    )
    print(
        "  gateway: POST /v1/chat/completions stream=true, SSE read with httpx + httpx-sse, "
        "each chunk's JSON parsed; grpc: GenerationService.GenerateStream"
    )
    print(f"  {'path':<8} {'streams':>8} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'tok/s p50':>10}")
    for path in ("grpc", "gateway"):
        p95 = statistics.quantiles(ttft[path], n=20)[-1] * 1e3
        print(
            f"  {path:<8} {len(ttft[path]):8d} {p50_ms(ttft[path]):12.2f} {p95:12.2f} "
            f"{statistics.median(rate[path]):10.1f}"
        )
    added = p50_ms(ttft["gateway"]) - p50_ms(ttft["grpc"])
    ratio = statistics.median(rate["gateway"]) / statistics.median(rate["grpc"])
    print(f"  added TTFT p50:              {added:7.2f} ms   (goal <= 3 ms)")
    print(f"  gateway / direct tokens/s:   {ratio:7.3f}      (goal >= 0.9)")
    print(
        f"\nembeddings, {EMBED_CONCURRENCY} concurrent callers, one text a request, "
        f"{embed_rounds} interleaved rounds of {embed_requests} per path (medians)"
    )
    gw, direct = statistics.median(emb["gateway"]), statistics.median(emb["grpc"])
    print(f"  grpc Embed:           {direct:8.1f} requests/s")
    print(f"  gateway /v1/embeddings: {gw:6.1f} requests/s   ({gw / direct:.2f} of gRPC)")


# -------------------------------------------------------------------------------- soak
@dataclass
class Outcome:
    kind: str
    at: float  # seconds since the phase began, when the request started
    latency: float
    cause: str | None = None  # None: it succeeded


@dataclass
class Phase:
    name: str
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (s since start, what)
    wall_start: float = 0.0  # time.time() at the start, to place log lines


def error_cause(status: int, body: str) -> str:
    try:
        error = json.loads(body)["error"]
        return f"HTTP {status} {error.get('code') or error.get('type')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {status}: {body[:200]}"


async def one_request(http: httpx.AsyncClient, kind: str, n: int) -> str | None:
    """Make one request of `kind`; None when it succeeded, else its cause."""
    question = QUESTIONS[n % len(QUESTIONS)]
    # Distinct prompts: each chat reaches the LLM server (the generation cache still
    # looks up and stores every answer in Redis).
    messages = [{"role": "user", "content": f"{question} (request {n})"}]
    if kind == "embed":
        reply = await http.post(
            "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": f"{question} {n}"}
        )
        if reply.status_code != 200:
            return error_cause(reply.status_code, reply.text)
        return None if len(reply.json()["data"]) == 1 else "embeddings: no vector"
    # temperature 0: deterministic, so the generation service's Redis cache is used.
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 64,
        "temperature": 0,
    }
    if kind == "rag":
        body["rag"] = {"collection": COLLECTION, "top_k": 5, "top_n": 2}
    if kind != "stream":
        reply = await http.post("/v1/chat/completions", json=body)
        if reply.status_code != 200:
            return error_cause(reply.status_code, reply.text)
        answer = reply.json()
        if not answer["choices"][0]["message"]["content"]:
            return "chat: an empty answer"
        if kind == "rag" and not answer.get("citations"):
            return "rag: no citations"
        return None
    body["stream"] = True
    done = False
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return error_cause(reply.status_code, (await reply.aread()).decode())
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
            elif "error" in (chunk := json.loads(data)):
                return f"stream error event: {chunk['error'].get('message')}"
    return None if done else "stream ended without [DONE]"


async def soak(url: str, key: str, phase: Phase, faults: Any = None) -> None:
    """SOAK_CLIENTS clients, each cycling through the kinds, for `phase.seconds`."""
    limits = httpx.Limits(max_connections=SOAK_CLIENTS, max_keepalive_connections=SOAK_CLIENTS)
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as http:
        start = time.perf_counter()
        phase.wall_start = time.time()
        end = start + phase.seconds
        counter = iter(range(10**9))

        async def client(c: int) -> None:
            turn = c
            while time.perf_counter() < end:
                kind, n = KINDS[turn % len(KINDS)], next(counter)
                turn += 1
                began = time.perf_counter()
                try:
                    cause = await one_request(http, kind, n)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    cause = f"{type(exc).__name__}: {exc}"[:200]
                now = time.perf_counter()
                phase.outcomes.append(Outcome(kind, began - start, now - began, cause))

        tasks = [client(c) for c in range(SOAK_CLIENTS)]
        if faults is not None:
            tasks.append(asyncio.to_thread(faults, lambda what: phase.events.append(
                (time.perf_counter() - start, what))))  # fmt: skip
        await asyncio.gather(*tasks)


def report(phase: Phase) -> None:
    done = phase.outcomes
    failed = [o for o in done if o.cause]
    print(
        f"\n  {phase.name}: {len(done)} requests in {phase.seconds:g} s "
        f"({len(done) / phase.seconds:.1f}/s), failed: {len(failed)}   (goal 0)"
    )
    print(f"    {'kind':<8} {'requests':>9} {'failed':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for kind in (*KINDS, "all"):
        mine = [o for o in done if kind in ("all", o.kind)]
        ok = [o.latency for o in mine if not o.cause]
        label = {"chat": "chat", "stream": "streamed", "embed": "embed", "rag": "rag"}.get(
            kind, "all"
        )
        print(
            f"    {label:<8} {len(mine):9d} {len(mine) - len(ok):7d} "
            f"{p50_ms(ok) if ok else float('nan'):9.1f} {p99_ms(ok):9.1f}"
        )
    for at, what in phase.events:
        print(f"    at {at:5.1f} s: {what}")
    causes: dict[str, list[Outcome]] = defaultdict(list)
    for o in failed:  # one group per cause, whatever the request id
        causes[re.sub(r"request id [0-9a-f]+", "request id ...", o.cause or "")].append(o)
    for cause, outcomes in sorted(causes.items(), key=lambda c: -len(c[1])):
        kinds = Counter(o.kind for o in outcomes)
        first, last = min(o.at for o in outcomes), max(o.at + o.latency for o in outcomes)
        print(
            f"    {len(outcomes):5d} x {cause}\n"
            f"            kinds {dict(kinds)}, started {first:.1f} s .. ended {last:.1f} s"
        )


def log_warnings(phase: Phase, files: list[Path]) -> None:
    """The warnings and errors the stack logged during the phase, grouped: the evidence
    for the failures above (or that the faults were absorbed)."""
    seen: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["ts"]).timestamp() - phase.wall_start
            except (ValueError, KeyError):
                continue
            during = -1 <= at <= phase.seconds + 5
            if during and entry.get("level") in ("warning", "error", "critical"):
                # The exception's last line says what went wrong; addresses would split groups.
                exc = str(entry.get("exc") or "").strip().splitlines()
                detail = exc[-1] if exc else str(entry.get("error") or entry.get("reason") or "")
                msg = re.sub(r"0x[0-9a-f]+", "0x...", f"{entry['level']}: {entry['msg']}")
                key = (entry.get("service", "?"), msg, detail[:200])
                seen[key].append(at)
    if not seen:
        print("    no warnings or errors in the stack's logs during the phase")
        return
    print("    the stack's warnings and errors during the phase (service, message, times):")
    for (service, msg, detail), times in sorted(seen.items(), key=lambda s: min(s[1])):
        print(
            f"      {service}: {msg} x{len(times)} at {min(times):.1f}..{max(times):.1f} s"
            + (f"\n        {detail}" if detail else "")
        )


def stack_env(state: Path, fake_url: str, tokenizer: Path) -> tuple[dict[str, str], int]:
    """`daert up`'s environment: free ports for everything (others may run a stack here),
    the fake as the LLM server, Airflow off. Returns it and the gateway's port."""
    env = dict(os.environ)
    for name in list(env):  # addresses `up` fills in itself, or inherited from a shell
        if name.endswith(("_TARGET", "_DSN", "_REDIS_URL")) and name.startswith("DAERT_"):
            del env[name]
    for service in SERVICES:
        env[f"DAERT_{service.upper()}_PORT"] = str(free_port())
        env[f"DAERT_{service.upper()}_METRICS_PORT"] = str(free_port())
    gateway_port = free_port()
    env |= {
        "DAERT_GATEWAY_PORT": str(gateway_port),
        "DAERT_GATEWAY_METRICS_PORT": str(free_port()),
        "DAERT_LLM_PORT": str(free_port()),
        "DAERT_AIRFLOW_PORT": str(free_port()),
        "DAERT_AIRFLOW_ENABLED": "false",
        "DAERT_GENERATION_MODELS": generation_models(fake_url),
        # The context service counts RAG prompts; without the embedded LLM, a local tokenizer.
        "DAERT_CONTEXT_TOKENIZERS": json.dumps(
            [{"name": MODEL, "kind": "huggingface", "path": str(tokenizer)}]
        ),
        "DAERT_STATE_DIR": str(state),
        "HF_HUB_OFFLINE": "1",
    }
    return env, gateway_port


async def load_corpus(embedding_target: str, retrieval_target: str) -> int:
    """tests/rag_corpus.py's handbook, for the development key's tenant (the default, "")."""
    from tests.rag_corpus import ACME, CORPUS, source_uri

    tenant, chunks = "", 0
    async with (
        EmbeddingClient(embedding_target) as embedding,
        RetrievalClient(retrieval_target) as retrieval,
    ):
        [probe] = await embedding.embed_texts(["dimensions"])
        await retrieval.stub.DeleteCollection(
            retrieval_pb2.DeleteCollectionRequest(
                collection=COLLECTION, tenant=tenant, allow_missing=True
            )
        )
        await retrieval.stub.CreateCollection(
            retrieval_pb2.CreateCollectionRequest(
                collection=COLLECTION, tenant=tenant, dimensions=len(probe)
            )
        )
        for document, title, _, texts in CORPUS[ACME]:
            vectors = await embedding.embed_texts(texts)
            batch = []
            for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                metadata = struct_pb2.Struct()
                metadata.update({"source_uri": source_uri("default", document), "title": title})
                batch.append(
                    retrieval_pb2.Chunk(
                        id=f"{document}-{i}",
                        document_id=document,
                        text=text,
                        vector=common_pb2.Vector(values=vector),
                        metadata=metadata,
                    )
                )
            await retrieval.stub.Upsert(
                retrieval_pb2.UpsertRequest(collection=COLLECTION, tenant=tenant, chunks=batch)
            )
            chunks += len(batch)
    return chunks


def redis_of(up_pid: int) -> tuple[int, int]:
    """The stack's redis-server, a child of `daert up`: its pid and port (redis-server
    rewrites its command line to "redis-server 127.0.0.1:<port>")."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            title = (proc / "cmdline").read_bytes().decode().replace("\0", " ").strip()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == up_pid and stat.split("(", 1)[1].startswith("redis-server)"):
            return int(proc.name), int(title.rsplit(":", 1)[1].split()[0])
    raise RuntimeError(f"no redis-server child of daert up (pid {up_pid})")


class Faults:
    """Kill and restart Redis, restart PostgreSQL, at fixed points of a phase."""

    def __init__(self, state: Path, seconds: float, up_pid: int) -> None:
        self.state = state
        self.seconds = seconds
        self.up_pid = up_pid
        self.redis: EmbeddedRedis | None = None  # the restarted one is ours to stop

    def __call__(self, note: Any) -> None:
        import pgserver  # the embedded PostgreSQL's wheel, with its pg_ctl

        begin = time.monotonic()

        def at(fraction: float, plus: float = 0.0) -> None:
            time.sleep(max(0.0, begin + self.seconds * fraction + plus - time.monotonic()))

        at(0.2)
        pid, port = redis_of(self.up_pid)
        os.kill(pid, signal.SIGKILL)
        note(f"Redis SIGKILLed (pid {pid}, port {port})")
        at(0.2, 5.0)
        # As `daert up` started it: the same command, port and data folder.
        self.redis = EmbeddedRedis(self.state / "redis", port=port, persist=True)
        self.redis.start()
        note("Redis restarted, same port and data folder, answering PING")
        at(0.5)
        pgdata = (self.state / "pgdata").resolve()
        user = "pgserver" if os.geteuid() == 0 else None  # pgserver's user when run as root
        note("PostgreSQL restart begins (pg_ctl restart -m fast)")
        pgserver.pg_ctl(
            ["-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"],
            pgdata=pgdata,
            user=user,
            timeout=60,
        )
        note("PostgreSQL restarted, accepting connections again")

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()


def start_stack(command: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen(
            command,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our terminal's Ctrl-C is not its own
        )


def copy_logs(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.exists():
            shutil.copy(path, folder / path.name)
    log(f"soak: the stack's logs copied to {folder}")


def stop_stack(up: subprocess.Popen[bytes]) -> None:
    """SIGINT, as Ctrl-C: `daert up` drains the services, then its data services."""
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            log("daert up did not stop within 120 s; killing its process group")
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log(f"daert up exited with {up.returncode}")


async def whole_stack(seconds: float, keep_logs: Path | None) -> None:
    from tests.integration.context_support import make_tokenizer

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-soak-")))
        state = tmp / "state"
        fake = stack.enter_context(Fake(SOAK_REPLY_TOKENS, SOAK_TOKEN_DELAY_S))
        env, port = stack_env(state, fake.url, make_tokenizer(tmp / "tokenizer"))
        url = f"http://127.0.0.1:{port}"
        out = tmp / "up.out"
        daert = Path(sys.executable).with_name("daert")
        log(f"soak: {daert} up --state-dir {state} (Airflow off; output in {out})")
        up = start_stack([str(daert), "up", "--state-dir", str(state)], env, out)
        faults = Faults(state, seconds, up.pid)
        stack.callback(faults.stop)  # the Redis we restarted, once `up` has stopped
        stack.callback(stop_stack, up)
        try:
            await wait_ready(url, 600, alive=lambda: up.poll() is None)
        except (RuntimeError, TimeoutError):
            log(out.read_text(errors="replace")[-4000:])
            raise
        key = (state / "gateway" / "dev-key").read_text().strip()
        target = {s: f"localhost:{env[f'DAERT_{s.upper()}_PORT']}" for s in SERVICES}
        chunks = await load_corpus(target["embedding"], target["retrieval"])
        log(f"soak: the stack is ready; {chunks} chunks in {COLLECTION!r} for tenant ''")
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # warm each kind
            http.headers["authorization"] = f"Bearer {key}"
            for n, kind in enumerate(KINDS):
                if cause := await one_request(http, kind, n):
                    raise RuntimeError(f"warm-up {kind} failed: {cause}")

        logs = [out, state / "gateway" / "gateway.log"]
        print(
            f"\nwhole-stack soak: `daert up` (every service, embedded PostgreSQL and Redis; "
            f"DAERT_AIRFLOW_ENABLED=false to leave the {os.cpu_count()} shared cores to the soak), "
            f"the fake vLLM server as its LLM ({SOAK_REPLY_TOKENS}-token replies at "
            f"{SOAK_TOKEN_DELAY_S * 1e3:g} ms a token)"
        )
        print(
            f"  {SOAK_CLIENTS} clients through the gateway with the development key (tenant ''),"
            " each cycling chat unary, chat streamed (httpx, SSE to [DONE]; chats at temperature"
            " 0 with distinct prompts: each a cache miss and store in Redis), embeddings, RAG "
            f"chat over {COLLECTION!r} ({chunks} chunks; top_k 5, top_n 2); latency of "
            "successful requests, to the end of the stream; no client-side retries",
            flush=True,
        )
        clean = Phase("steady", seconds)
        log(f"soak: {SOAK_CLIENTS} clients for {seconds:g} s")
        await soak(url, key, clean)
        report(clean)
        log_warnings(clean, logs)
        faulty = Phase("with faults", seconds)
        log(f"soak: {SOAK_CLIENTS} clients for {seconds:g} s, killing Redis, restarting PostgreSQL")
        await soak(url, key, faulty, faults)
        report(faulty)
        log_warnings(faulty, logs)
        if keep_logs is not None:
            stop_stack(up)  # first, so the logs are complete
            copy_logs([*logs, state / "pgdata" / "log", state / "redis" / "redis.log"], keep_logs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["overhead", "soak"], help="run just one part")
    parser.add_argument("--streams", type=int, default=60, help="chat streams per path")
    parser.add_argument("--embed-rounds", type=int, default=6)
    parser.add_argument("--embed-requests", type=int, default=60, help="per path per round")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="per soak phase")
    parser.add_argument("--keep-logs", type=Path, help="copy the soak stack's logs here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop every process
    if args.only in (None, "overhead"):
        asyncio.run(overhead(args.streams, args.embed_rounds, args.embed_requests))
    if args.only in (None, "soak"):
        asyncio.run(whole_stack(args.soak_seconds, args.keep_logs))
