"""The LoRA router end to end: real router processes over a real PostgreSQL (registry),
a real Redis (shared placement state) and the real embedding service (all-MiniLM-L6-v2, for
"auto" routing). Inference replicas are the vLLM fake (tests/fakes/openai.py: runtime LoRA
load/unload in vLLM's wire format); LoRAX replicas are only probed on /health by the router,
so the same fake stands in for them.

Adapters that have examples or a description are restricted to their test's tenant, so each
test's "auto" candidates are its own."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from daert.clients import LoraRouterClient, field_violations
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import common_pb2, lora_pb2
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from tests.fakes import FakeOpenAI, RecordedRequest
from tests.helpers import free_port

BASE = "llama-3.1-8b"
OTHER_BASE = "mistral-7b"

USER = common_pb2.ROLE_USER
EXPLICIT = lora_pb2.ROUTE_REASON_EXPLICIT
TENANT_DEFAULT = lora_pb2.ROUTE_REASON_TENANT_DEFAULT
SEMANTIC = lora_pb2.ROUTE_REASON_SEMANTIC
BELOW_THRESHOLD = lora_pb2.ROUTE_REASON_BASE_MODEL_FALLBACK_BELOW_THRESHOLD
NO_CANDIDATES = lora_pb2.ROUTE_REASON_BASE_MODEL_FALLBACK_NO_CANDIDATES
BASE_REQUESTED = lora_pb2.ROUTE_REASON_BASE_MODEL_REQUESTED

SEMANTIC_ADAPTERS = {
    "sql-helper": (
        "Writes and explains SQL queries for PostgreSQL and MySQL databases.",
        [
            "Write a SQL query that returns the ten customers with the highest total order value.",
            "How do I join the orders and customers tables and group the results by country?",
            "Why does my SELECT with a LEFT JOIN return duplicate rows?",
        ],
    ),
    "legal-contracts": (
        "Reviews and drafts commercial contracts: NDAs, indemnities, termination and "
        "liability clauses.",
        [
            "Draft a mutual non-disclosure agreement between two software companies.",
            "Is this limitation of liability clause enforceable if the vendor is grossly "
            "negligent?",
            "Explain the termination for convenience clause in this services agreement.",
        ],
    ),
    "poetry": (
        "Writes poems: sonnets, haiku and free verse.",
        [
            "Write a sonnet about the sea at dawn.",
            "Compose a haiku about autumn leaves falling.",
            "A short free-verse poem about missing home.",
        ],
    ),
}


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dsn(postgres: EmbeddedPostgres) -> str:
    """A database of this module's own in the session's PostgreSQL."""
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS lora_test WITH (FORCE)")
        conn.execute("CREATE DATABASE lora_test")
    return make_conninfo(postgres.dsn, dbname="lora_test")


@pytest.fixture(scope="module")
def lorax() -> Iterator[FakeOpenAI]:
    """Health endpoint for LoRAX replicas (the router only probes them)."""
    with FakeOpenAI(models=[BASE]) as fake:
        yield fake


def replica(
    name: str, fake: FakeOpenAI, kind: str = "lorax", base: str = BASE, **extra: Any
) -> dict[str, Any]:
    return {"name": name, "url": fake.url, "kind": kind, "base_model": base, **extra}


def router_env(
    dsn: str, replicas: list[dict[str, Any]], redis: EmbeddedRedis | None, **settings: Any
) -> dict[str, str]:
    env = {
        "DAERT_LORA_DSN": dsn,
        "DAERT_LORA_REPLICAS": json.dumps(replicas),
        "DAERT_LORA_HEALTH_INTERVAL_S": "0.5",
        "DAERT_LORA_REPLICA_PROBE_INTERVAL_S": "0.3",
        "DAERT_LORA_CONNECT_TIMEOUT_S": "2",
        # A key prefix per router set: tests never see each other's placement state.
        "DAERT_LORA_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex}:",
    }
    if redis is not None:
        env["DAERT_LORA_REDIS_URL"] = redis.url
    env.update({f"DAERT_LORA_{key.upper()}": str(value) for key, value in settings.items()})
    return env


@contextmanager
def running(env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess("lora", env) as server:
        server.wait_health("SERVING", timeout_s=60)
        yield server


@pytest.fixture(scope="module")
def router(
    lora_dsn: str,
    lorax: FakeOpenAI,
    redis_server: EmbeddedRedis,
    embedding_server: ServerProcess,
) -> Iterator[ServerProcess]:
    """The router most tests share: one LoRAX replica per base model."""
    replicas = [replica("lorax-0", lorax), replica("lorax-1", lorax, base=OTHER_BASE)]
    env = router_env(lora_dsn, replicas, redis_server)
    env["DAERT_EMBEDDING_TARGET"] = embedding_server.target
    with running(env) as server:
        yield server


def adapter(name: str, **fields: Any) -> lora_pb2.Adapter:
    fields.setdefault("source", f"/adapters/{name}")
    fields.setdefault("base_model", BASE)
    return lora_pb2.Adapter(name=name, **fields)


async def register(client: LoraRouterClient, name: str, **fields: Any) -> lora_pb2.Adapter:
    reply = await client.stub.RegisterAdapter(
        lora_pb2.RegisterAdapterRequest(adapter=adapter(name, **fields))
    )
    return reply.adapter


async def route(
    client: LoraRouterClient, adapter: str = "", **fields: Any
) -> lora_pb2.RouteResponse:
    text = fields.pop("text", None)
    if text is not None:
        fields["messages"] = [common_pb2.ChatMessage(role=USER, content=text)]
    reply: lora_pb2.RouteResponse = await client.stub.Route(
        lora_pb2.RouteRequest(adapter=adapter, **fields)
    )
    return reply


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def replicas(client: LoraRouterClient) -> dict[str, lora_pb2.ReplicaStatus]:
    reply = await client.stub.ListReplicas(lora_pb2.ListReplicasRequest())
    return {status.replica.name: status for status in reply.replicas}


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """A sample's value from the server's /metrics, 0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, within_s: float = 30.0
) -> None:
    """Poll `check` until it holds; fail with `what` after `within_s`. Only a check that never
    holds waits that long, so a busy machine cannot fail it."""
    deadline = time.monotonic() + within_s
    while True:
        held = check()
        if await held if inspect.isawaitable(held) else held:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# --- registry ---------------------------------------------------------------------------------


async def test_register_get_list_replace_delete(router: ServerProcess) -> None:
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        stored = await register(
            client,
            "reg-support",
            description="Answers support tickets",
            tenants=["acme", "acme"],
        )
        assert stored.source == "/adapters/reg-support" and list(stored.tenants) == ["acme"]
        assert stored.created_at.seconds > 0 and stored.updated_at == stored.created_at
        got = await client.stub.GetAdapter(lora_pb2.GetAdapterRequest(name="reg-support"))
        assert got.adapter == stored
        await register(client, "reg-open", base_model=OTHER_BASE)

        async def names(**filters: str) -> list[str]:
            reply = await client.stub.ListAdapters(lora_pb2.ListAdaptersRequest(**filters))
            return [a.name for a in reply.adapters if a.name.startswith("reg-")]

        assert await names() == ["reg-open", "reg-support"]
        assert await names(base_model=OTHER_BASE) == ["reg-open"]
        assert await names(tenant="acme") == ["reg-open", "reg-support"]
        assert await names(tenant="globex") == ["reg-open"]

        error = await rpc_error(register(client, "reg-support"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        replaced = await client.stub.RegisterAdapter(
            lora_pb2.RegisterAdapterRequest(
                adapter=adapter("reg-support", source="hub-org/support-v2"), replace=True
            )
        )
        assert replaced.adapter.source == "hub-org/support-v2"
        assert replaced.adapter.created_at == stored.created_at
        assert replaced.adapter.updated_at.ToDatetime() > stored.created_at.ToDatetime()

        delete = lora_pb2.DeleteAdapterRequest(name="reg-support")
        assert (await client.stub.DeleteAdapter(delete)).deleted
        assert not (await client.stub.DeleteAdapter(delete)).deleted
        error = await rpc_error(
            client.stub.GetAdapter(lora_pb2.GetAdapterRequest(name="reg-support"))
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND


BAD_REGISTRATIONS = [
    (lora_pb2.RegisterAdapterRequest(), "adapter"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("auto")), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("Base")), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("sql helper")), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("x/y")), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("x" * 129)), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("")), "adapter.name"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-1", source="")), "adapter.source"),
    (lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-2", source="a b")), "adapter.source"),
    (
        lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-3", base_model="")),
        "adapter.base_model",
    ),
    (
        lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-4", base_model="gpt-neo-unserved")),
        "adapter.base_model",
    ),
    (
        lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-5", examples=["fine", "  "])),
        "adapter.examples[1]",
    ),
    (
        lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-6", tenants=["ok", ""])),
        "adapter.tenants[1]",
    ),
    (
        lora_pb2.RegisterAdapterRequest(adapter=adapter("bad-7", tenants=["no spaces"])),
        "adapter.tenants[0]",
    ),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REGISTRATIONS)
async def test_bad_registrations_name_the_field(
    router: ServerProcess, request_: lora_pb2.RegisterAdapterRequest, field: str
) -> None:
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        error = await rpc_error(client.stub.RegisterAdapter(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in field_violations(error), error.details()


async def test_bad_routing_requests_name_the_field(router: ServerProcess) -> None:
    unset_role = [common_pb2.ChatMessage(content="hi")]
    cases: list[tuple[Any, str]] = [
        (lora_pb2.RouteRequest(adapter="bad name!"), "adapter"),
        (lora_pb2.RouteRequest(tenant="bad tenant!"), "tenant"),
        (lora_pb2.RouteRequest(base_model="gpt-neo-unserved"), "base_model"),
        (lora_pb2.RouteRequest(base_model="has space"), "base_model"),
        (lora_pb2.RouteRequest(adapter="auto", min_score=1.5), "min_score"),
        (lora_pb2.RouteRequest(adapter="auto"), "messages"),
        (lora_pb2.RouteRequest(adapter="base", messages=unset_role), "messages[0].role"),
    ]
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        await register(client, "bad-route-target")
        cases.append(
            (lora_pb2.RouteRequest(adapter="bad-route-target", base_model=OTHER_BASE), "base_model")
        )
        for request_, field in cases:
            error = await rpc_error(client.stub.Route(request_))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request_, error.details())
            assert field in field_violations(error), (request_, error.details())
        for route_id in ("", "not-a-route-id"):
            error = await rpc_error(
                client.stub.ReleaseRoute(lora_pb2.ReleaseRouteRequest(route_id=route_id))
            )
            assert "route_id" in field_violations(error)
        error = await rpc_error(
            client.stub.SetTenantDefault(lora_pb2.SetTenantDefaultRequest(adapter="auto"))
        )
        assert "adapter" in field_violations(error)
        error = await rpc_error(client.stub.GetAdapter(lora_pb2.GetAdapterRequest()))
        assert "name" in field_violations(error)


async def test_a_nul_character_in_any_string_is_invalid_argument(router: ServerProcess) -> None:
    """PostgreSQL refuses NUL in text; the runtime turns it away before any servicer runs
    (was INTERNAL: psycopg.DataError)."""
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        error = await rpc_error(
            client.stub.ListAdapters(lora_pb2.ListAdaptersRequest(tenant="acme\x00"))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NUL" in field_violations(error)["tenant"]
        nested = lora_pb2.RouteRequest(
            adapter="base", messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER,
                                                            content="hi\x00")]
        )  # fmt: skip
        error = await rpc_error(client.stub.Route(nested))
        assert "messages[0].content" in field_violations(error)
    router.wait_health("SERVING")


async def test_registry_survives_a_router_restart(
    lora_dsn: str, lorax: FakeOpenAI, redis_server: EmbeddedRedis
) -> None:
    env = router_env(lora_dsn, [replica("lorax-0", lorax)], redis_server)
    with running(env) as first:
        async with LoraRouterClient(first.target) as client:
            stored = await register(
                client, "persisted", description="kept across restarts", tenants=["restart"]
            )
    with running(env) as second:
        async with LoraRouterClient(second.target) as client:
            got = await client.stub.GetAdapter(lora_pb2.GetAdapterRequest(name="persisted"))
            assert got.adapter == stored
            assert (await route(client, "persisted", tenant="restart")).reason == EXPLICIT


# --- which adapter ------------------------------------------------------------------------------


async def test_explicit_routing_never_falls_back_to_the_base_model(router: ServerProcess) -> None:
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        await register(client, "exp-sql", tenants=["acme"], source="s3://adapters/exp-sql")
        reply = await route(client, "exp-sql", tenant="acme")
        assert (reply.adapter_id, reply.adapter_source) == ("exp-sql", "s3://adapters/exp-sql")
        assert reply.reason == EXPLICIT and not reply.HasField("score")
        assert reply.replica.name == "lorax-0" and reply.replica.kind == lora_pb2.REPLICA_KIND_LORAX
        assert reply.base_model == BASE and reply.route_id.startswith("lorax-0/")

        denied = await rpc_error(route(client, "exp-sql", tenant="globex"))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "globex" in (denied.details() or "")
        unknown = await rpc_error(route(client, "exp-nonexistent", tenant="acme"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert "exp-nonexistent" in (unknown.details() or "")


async def test_tenant_defaults(router: ServerProcess) -> None:
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        await register(client, "def-legal", tenants=["initech"])
        await register(client, "def-support", tenants=["initech", "umbrella"])

        async def set_default(tenant: str, name: str) -> str:
            reply = await client.stub.SetTenantDefault(
                lora_pb2.SetTenantDefaultRequest(tenant=tenant, adapter=name)
            )
            return reply.previous_adapter

        assert await set_default("initech", "def-support") == ""
        assert await set_default("initech", "def-legal") == "def-support"
        assert await set_default("umbrella", "def-support") == ""
        denied = await rpc_error(set_default("umbrella", "def-legal"))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        missing = await rpc_error(set_default("umbrella", "def-nonexistent"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        listed = await client.stub.ListTenantDefaults(lora_pb2.ListTenantDefaultsRequest())
        pairs = [(d.tenant, d.adapter) for d in listed.defaults]
        assert pairs == sorted(pairs)
        assert {("initech", "def-legal"), ("umbrella", "def-support")} <= set(pairs)

        reply = await route(client, "", tenant="initech")
        assert (reply.adapter_id, reply.reason) == ("def-legal", TENANT_DEFAULT)
        reply = await route(client, "base", tenant="initech")
        assert (reply.adapter_id, reply.reason) == ("", BASE_REQUESTED)
        reply = await route(client, "", tenant="initech", base_model=OTHER_BASE)
        assert (reply.adapter_id, reply.reason) == ("", BASE_REQUESTED)  # not its base model
        assert reply.base_model == OTHER_BASE and reply.replica.name == "lorax-1"
        reply = await route(client, "", tenant="hooli")
        assert (reply.adapter_id, reply.reason) == ("", BASE_REQUESTED)

        # Replacing an adapter without a tenant drops that tenant's default; deleting one
        # drops every default naming it.
        await client.stub.RegisterAdapter(
            lora_pb2.RegisterAdapterRequest(
                adapter=adapter("def-support", tenants=["initech"]), replace=True
            )
        )
        reply = await route(client, "", tenant="umbrella")
        assert reply.reason == BASE_REQUESTED
        await client.stub.DeleteAdapter(lora_pb2.DeleteAdapterRequest(name="def-legal"))
        reply = await route(client, "", tenant="initech")
        assert reply.reason == BASE_REQUESTED
        assert await set_default("initech", "def-support") == ""
        assert await set_default("initech", "") == "def-support"


async def test_semantic_routing(router: ServerProcess) -> None:
    tenant = "semantic"
    async with LoraRouterClient(router.target, max_attempts=1) as client:
        for name, (description, examples) in SEMANTIC_ADAPTERS.items():
            await register(
                client, name, description=description, examples=examples, tenants=[tenant]
            )
        # Without examples an adapter is compared by its description alone; with neither it
        # is no candidate.
        await register(
            client,
            "bread-baking",
            description="Bread baking help: kneading and proofing dough, sourdough starters "
            "and oven temperatures.",
            tenants=[tenant],
        )
        await register(client, "blank-adapter", description="  ", tenants=[tenant, "blank-only"])
        expectations = {
            "Can you write a query to count the orders per month in the orders table?": (
                "sql-helper"
            ),
            "Please review the indemnification clause in our supplier agreement.": (
                "legal-contracts"
            ),
            "Write me a little poem about the moon rising over the mountains.": "poetry",
            "How long should I knead the dough for a loaf of sourdough bread?": "bread-baking",
        }
        for text, expected in expectations.items():
            reply = await route(client, "auto", tenant=tenant, text=text)
            assert (reply.adapter_id, reply.reason) == (expected, SEMANTIC), text
            assert 0.35 <= reply.score <= 1.0, (text, reply.score)
            assert reply.adapter_source == f"/adapters/{expected}"

        # The request is the last user message; earlier turns and the system prompt don't
        # decide.
        conversation = [
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You are helpful."),
            common_pb2.ChatMessage(role=USER, content="Write a haiku about the rain."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="Soft rain falls..."),
            common_pb2.ChatMessage(
                role=USER, content="Now a SQL query listing customers without orders."
            ),
        ]
        reply = await route(client, "auto", tenant=tenant, messages=conversation)
        assert reply.adapter_id == "sql-helper"

        unrelated = "Recommend a good hiking trail near Lake Geneva."
        reply = await route(client, "auto", tenant=tenant, text=unrelated)
        assert (reply.adapter_id, reply.reason) == ("", BELOW_THRESHOLD)
        assert reply.HasField("score") and reply.score < 0.35
        sql_text = next(iter(expectations))
        strict = await route(client, "auto", tenant=tenant, text=sql_text, min_score=0.95)
        assert (strict.adapter_id, strict.reason) == ("", BELOW_THRESHOLD)

        await client.stub.SetTenantDefault(
            lora_pb2.SetTenantDefaultRequest(tenant=tenant, adapter="poetry")
        )
        reply = await route(client, "auto", tenant=tenant, text=unrelated)
        assert (reply.adapter_id, reply.reason) == ("poetry", TENANT_DEFAULT)
        assert reply.HasField("score")

        # No adapter with examples or a description that this tenant may use: no comparison
        # at all.
        for other in ("no-candidates", "blank-only"):
            reply = await route(client, "auto", tenant=other, text=sql_text)
            assert (reply.adapter_id, reply.reason) == ("", NO_CANDIDATES), other
            assert not reply.HasField("score")


async def test_auto_needs_the_embedding_service_only_with_candidates(
    lora_dsn: str, lorax: FakeOpenAI
) -> None:
    env = router_env(lora_dsn, [replica("lorax-0", lorax)], None)
    env["DAERT_EMBEDDING_TARGET"] = f"127.0.0.1:{free_port()}"
    with running(env) as server:
        async with LoraRouterClient(server.target, max_attempts=1) as client:
            await register(client, "emb-sql", examples=["SELECT 1"], tenants=["emb-down"])
            text = "a SQL query please"
            error = await rpc_error(route(client, "auto", tenant="emb-down", text=text))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "embedding service" in (error.details() or "")
            reply = await route(client, "auto", tenant="emb-nothing", text=text)
            assert reply.reason == NO_CANDIDATES
            assert (await route(client, "emb-sql", tenant="emb-down")).reason == EXPLICIT


# --- which replica ------------------------------------------------------------------------------


async def test_affinity_and_lru_eviction(lora_dsn: str, redis_server: EmbeddedRedis) -> None:
    with FakeOpenAI(models=[BASE]) as r0, FakeOpenAI(models=[BASE]) as r1:
        replicas_ = [
            replica("r0", r0, max_resident_adapters=3),
            replica("r1", r1, max_resident_adapters=3),
        ]
        env = router_env(lora_dsn, replicas_, redis_server, popularity_half_life=0)
        with running(env) as server:
            async with LoraRouterClient(server.target, max_attempts=1) as client:
                names = [f"aff-{c}" for c in "abcdefg"]
                for name in names:
                    await register(client, name)

                async def once(name: str) -> lora_pb2.RouteResponse:
                    reply = await route(client, name)
                    release = lora_pb2.ReleaseRouteRequest(route_id=reply.route_id)
                    assert (await client.stub.ReleaseRoute(release)).released
                    return reply

                first, second = await once("aff-a"), await once("aff-a")
                assert first.loaded and not second.loaded
                assert second.replica.name == first.replica.name == "r0"
                # Idle replicas: a cold adapter goes where a slot is free.
                placed = [await once(n) for n in names[1:6]]
                assert [p.replica.name for p in placed] == ["r0", "r0", "r1", "r1", "r1"]
                assert all(p.loaded for p in placed)
                await once("aff-a")  # now b is r0's least recently used
                seventh = await once("aff-g")
                assert seventh.loaded and seventh.replica.name == "r0"
                state = await replicas(client)
                assert list(state["r0"].resident_adapters) == ["aff-g", "aff-a", "aff-c"]
                assert list(state["r1"].resident_adapters) == ["aff-f", "aff-e", "aff-d"]
                assert state["r0"].max_resident_adapters == 3 and state["r0"].ready
                assert (await once("aff-b")).loaded  # evicted, so cold again


async def test_hot_adapter_spills_from_an_overloaded_replica(
    lora_dsn: str, lorax: FakeOpenAI, redis_server: EmbeddedRedis
) -> None:
    replicas_ = [replica("r0", lorax), replica("r1", lorax)]
    # Overloaded: more in flight than the mean + 1.
    env = router_env(lora_dsn, replicas_, redis_server, spill_factor=1, spill_margin=1)
    with running(env) as server:
        async with LoraRouterClient(server.target, max_attempts=1) as client:
            await register(client, "spill-hot")
            held = [await route(client, "spill-hot") for _ in range(4)]
            # In flight before each: (0, 0) cold; (1, 0) and (2, 0) within the limit;
            # (3, 0) is over 1.5 + 1, so the fourth spills and loads on the other replica.
            home = held[0].replica.name
            assert [h.replica.name == home for h in held] == [True, True, True, False]
            assert [h.loaded for h in held] == [True, False, False, True]
            state = await replicas(client)
            assert all(list(s.resident_adapters) == ["spill-hot"] for s in state.values())
            assert sorted(s.in_flight for s in state.values()) == [1, 3]
            # Both hold it now: the least loaded holder gets the next one, warm.
            fifth = await route(client, "spill-hot")
            assert fifth.replica.name != home and not fifth.loaded
            for reply in [*held, fifth]:
                await client.stub.ReleaseRoute(
                    lora_pb2.ReleaseRouteRequest(route_id=reply.route_id)
                )
            assert all(s.in_flight == 0 for s in (await replicas(client)).values())
        assert metric(server, "daert_lora_spills_total", replica="r1" if home == "r0" else "r0")


async def test_vllm_replica_loads_once_and_unloads_what_was_evicted(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    with FakeOpenAI(models=[BASE], enable_lora=True) as vllm:
        replicas_ = [replica("vllm-0", vllm, kind="vllm", max_resident_adapters=2)]
        env = router_env(lora_dsn, replicas_, redis_server, popularity_half_life=0)
        with running(env) as server:
            async with LoraRouterClient(server.target, max_attempts=1) as client:
                for name in ("v-a", "v-b", "v-c"):
                    await register(client, name)
                cold = await asyncio.gather(*(route(client, "v-a") for _ in range(8)))
                assert sum(r.loaded for r in cold) == 1
                loads = vllm.requests_to("/v1/load_lora_adapter")
                assert [r.json for r in loads] == [
                    {"lora_name": "v-a", "lora_path": "/adapters/v-a"}
                ]
                assert (await route(client, "v-b")).loaded
                evicting = await route(client, "v-c")
                assert evicting.loaded and evicting.replica.kind == lora_pb2.REPLICA_KIND_VLLM
                # v-a is evicted, but unloaded only once its routes end.
                assert vllm.requests_to("/v1/unload_lora_adapter") == []
                for reply in cold:
                    await client.stub.ReleaseRoute(
                        lora_pb2.ReleaseRouteRequest(route_id=reply.route_id)
                    )
                unloads = await unloads_of(vllm, 1)
                assert [r.json for r in unloads] == [{"lora_name": "v-a"}]
                # The replica's own memory matches the router's LRU.
                assert vllm.loaded_adapters == ["v-b", "v-c"]
                state = await replicas(client)
                assert list(state["vllm-0"].resident_adapters) == ["v-c", "v-b"]
                assert state["vllm-0"].in_flight == 2

                # New weights under the same name: the old ones leave the replica, and the
                # next route loads the new source.
                await client.stub.RegisterAdapter(
                    lora_pb2.RegisterAdapterRequest(
                        adapter=adapter("v-b", source="/adapters/v-b-2"), replace=True
                    )
                )
                assert vllm.loaded_adapters == ["v-c"]
                assert (await route(client, "v-b")).loaded
                assert vllm.lora_paths["v-b"] == "/adapters/v-b-2"
                # A deleted adapter is unloaded too.
                await client.stub.DeleteAdapter(lora_pb2.DeleteAdapterRequest(name="v-c"))
                assert vllm.loaded_adapters == ["v-b"]
                state = await replicas(client)
                assert list(state["vllm-0"].resident_adapters) == ["v-b"]
            assert metric(server, "daert_lora_adapter_loads_total", replica="vllm-0") == 4


async def unloads_of(vllm: FakeOpenAI, count: int, within_s: float = 30.0) -> list[RecordedRequest]:
    """The fake's unload requests once there are `count` (an evicted adapter's unload runs
    in the background), failing after `within_s` (polled: only a missing unload waits)."""
    deadline = time.monotonic() + within_s
    while len(unloads := vllm.requests_to("/v1/unload_lora_adapter")) < count:
        assert time.monotonic() < deadline, f"{len(unloads)} unloads, not {count}"
        await asyncio.sleep(0.05)
    return unloads


@asynccontextmanager
async def one_slot_vllm_router(
    lora_dsn: str, redis_server: EmbeddedRedis, replica_name: str, adapters: tuple[str, ...]
) -> AsyncIterator[tuple[FakeOpenAI, ServerProcess, LoraRouterClient]]:
    """A router with plain LRU over one vLLM replica that holds one adapter, and `adapters`
    registered: the smallest stage on which every cold route evicts."""
    with FakeOpenAI(models=[BASE], enable_lora=True) as vllm:
        replicas_ = [replica(replica_name, vllm, kind="vllm", max_resident_adapters=1)]
        env = router_env(lora_dsn, replicas_, redis_server, popularity_half_life=0)
        with running(env) as server:
            async with LoraRouterClient(server.target, max_attempts=1) as client:
                for name in adapters:
                    await register(client, name)
                yield vllm, server, client


async def test_an_evicted_adapter_is_unloaded_once_its_routes_end(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    stage = one_slot_vllm_router(lora_dsn, redis_server, "vllm-u", ("use-x", "use-y"))
    async with stage as (vllm, server, client):
        x = await route(client, "use-x")  # its request has not reached vLLM yet
        y = await route(client, "use-y")
        assert y.loaded and y.replica.name == "vllm-u"
        assert list((await replicas(client))["vllm-u"].resident_adapters) == ["use-y"]
        # Evicted, but unloading it now would fail x's request: vLLM keeps serving it.
        await asyncio.sleep(1.5)  # the unload polls 5 times meanwhile
        assert vllm.requests_to("/v1/unload_lora_adapter") == []
        assert vllm.loaded_adapters == ["use-x", "use-y"]
        await client.stub.ReleaseRoute(lora_pb2.ReleaseRouteRequest(route_id=x.route_id))
        # The release lets the pending unload go (how soon is the bench's business).
        unloads = await unloads_of(vllm, 1)
        assert [r.json for r in unloads] == [{"lora_name": "use-x"}]
        assert vllm.loaded_adapters == ["use-y"]
        labels = {"replica": "vllm-u", "outcome": "unloaded"}
        assert metric(server, "daert_lora_adapter_unloads_total", **labels) == 1


async def test_an_evicted_adapter_routed_back_before_its_unload_stays_loaded(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    stage = one_slot_vllm_router(lora_dsn, redis_server, "vllm-r", ("back-x", "back-y"))
    async with stage as (vllm, server, client):
        routed = [await route(client, "back-x"), await route(client, "back-y")]
        # x comes back cold while its first route is in flight: it evicts y, and
        # vLLM, still serving x, answers the load as already done.
        again = await route(client, "back-x")
        assert again.loaded and again.replica.name == "vllm-r"
        assert vllm.requests_to("/v1/unload_lora_adapter") == []
        for reply in [*routed, again]:
            await client.stub.ReleaseRoute(lora_pb2.ReleaseRouteRequest(route_id=reply.route_id))
        assert [r.json for r in await unloads_of(vllm, 1)] == [{"lora_name": "back-y"}]
        labels = {"replica": "vllm-r", "outcome": "resident_again"}
        # x's waiting unload has seen it resident again (whenever its poll came round).
        await eventually(
            lambda: metric(server, "daert_lora_adapter_unloads_total", **labels) == 1,
            "x's waiting unload never gave up on x",
        )
        assert len(vllm.requests_to("/v1/unload_lora_adapter")) == 1
        assert vllm.loaded_adapters == ["back-x"]
        assert list((await replicas(client))["vllm-r"].resident_adapters) == ["back-x"]


async def test_a_replaced_adapter_waiting_for_its_unload_is_unloaded_at_once(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    stage = one_slot_vllm_router(lora_dsn, redis_server, "vllm-n", ("new-x", "new-y"))
    async with stage as (vllm, _server, client):
        await route(client, "new-x")  # in flight: x's unload waits for it
        await route(client, "new-y")
        await client.stub.RegisterAdapter(
            lora_pb2.RegisterAdapterRequest(
                adapter=adapter("new-x", source="/adapters/new-x-2"), replace=True
            )
        )
        # Not resident in the placement, but vLLM still has the old weights.
        unloads = vllm.requests_to("/v1/unload_lora_adapter")
        assert [r.json for r in unloads] == [{"lora_name": "new-x"}]
        assert (await route(client, "new-x")).loaded
        assert vllm.lora_paths["new-x"] == "/adapters/new-x-2"


async def test_vllm_load_failures_are_clear_errors(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    with FakeOpenAI(models=[BASE], enable_lora=True) as vllm:
        env = router_env(lora_dsn, [replica("vllm-f", vllm, kind="vllm")], redis_server)
        with running(env) as server:
            async with LoraRouterClient(server.target, max_attempts=1) as client:
                await register(client, "v-missing", source="/adapters/not-there")
                vllm.missing_lora_paths.add("/adapters/not-there")
                error = await rpc_error(route(client, "v-missing"))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                details = error.details() or ""
                assert "v-missing" in details and "vllm-f" in details
                assert "No adapter found for /adapters/not-there" in details
                # Nothing of the failed route is left: not resident, not in flight.
                state = (await replicas(client))["vllm-f"]
                assert (list(state.resident_adapters), state.in_flight) == ([], 0)
                vllm.missing_lora_paths.clear()
                assert (await route(client, "v-missing")).loaded

                # Loaded behind the router's back: vLLM's "already loaded" is success.
                await register(client, "v-preloaded")
                vllm.load_adapter("v-preloaded", "/adapters/v-preloaded")
                assert (await route(client, "v-preloaded")).loaded

                vllm.stop()  # the replica goes away: its probe fails, routing says so
                deadline = time.monotonic() + 30  # polled: only a missed probe waits
                while (await replicas(client))["vllm-f"].ready:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                error = await rpc_error(route(client, "v-missing"))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "vllm-f" in (error.details() or "")


async def test_leases_expire(lora_dsn: str, lorax: FakeOpenAI, redis_server: EmbeddedRedis) -> None:
    env = router_env(lora_dsn, [replica("lease-0", lorax)], redis_server, route_lease_s=1)
    with running(env) as server:
        async with LoraRouterClient(server.target, max_attempts=1) as client:
            released = await route(client, "base")
            release = lora_pb2.ReleaseRouteRequest(route_id=released.route_id)
            assert (await client.stub.ReleaseRoute(release)).released
            assert not (await client.stub.ReleaseRoute(release)).released
            leaked = await route(client, "base")
            assert (await replicas(client))["lease-0"].in_flight == 1

            async def expired() -> bool:
                return (await replicas(client))["lease-0"].in_flight == 0

            await eventually(expired, "the leaked route's 1 s lease never expired")
            late = lora_pb2.ReleaseRouteRequest(route_id=leaked.route_id)
            assert not (await client.stub.ReleaseRoute(late)).released


# --- shared state and outages -------------------------------------------------------------------


async def test_two_routers_sharing_redis_agree(lora_dsn: str, redis_server: EmbeddedRedis) -> None:
    with (
        FakeOpenAI(models=[BASE], enable_lora=True) as v0,
        FakeOpenAI(models=[BASE], enable_lora=True) as v1,
    ):
        replicas_ = [replica("v0", v0, kind="vllm"), replica("v1", v1, kind="vllm")]
        env = router_env(lora_dsn, replicas_, redis_server)
        with running(env) as one, running(env) as two:
            async with (
                LoraRouterClient(one.target, max_attempts=1) as a,
                LoraRouterClient(two.target, max_attempts=1) as b,
            ):
                for name in ("two-a", "two-b", "two-c"):
                    await register(a, name)
                # Interleaved: each router sees what the other placed.
                first = await route(a, "two-a")
                again = await route(b, "two-a")
                assert first.loaded and not again.loaded
                assert again.replica.name == first.replica.name
                other = await route(b, "two-b")
                assert other.loaded and other.replica.name != first.replica.name
                assert not (await route(a, "two-b")).loaded
                assert await replicas(a) == await replicas(b)

                # Concurrent cold routes through both: exactly one load, counted once.
                burst = await asyncio.gather(*(route(client, "two-c") for client in [a, b] * 10))
                assert sum(r.loaded for r in burst) == 1
                loads = [
                    r.json["lora_name"]
                    for fake in (v0, v1)
                    for r in fake.requests_to("/v1/load_lora_adapter")
                ]
                assert sorted(loads) == ["two-a", "two-b", "two-c"]
                state = await replicas(a)
                assert sum(s.in_flight for s in state.values()) == 24
                # Released through the other router: the in-flight count is shared.
                for reply in burst:
                    await b.stub.ReleaseRoute(lora_pb2.ReleaseRouteRequest(route_id=reply.route_id))
                state = await replicas(a)
                assert sum(s.in_flight for s in state.values()) == 4
                assert state == await replicas(b)


async def test_a_route_through_another_router_waits_for_the_load_under_way(
    lora_dsn: str, redis_server: EmbeddedRedis
) -> None:
    with FakeOpenAI(models=[BASE], enable_lora=True) as vllm:
        env = router_env(lora_dsn, [replica("vllm-w", vllm, kind="vllm")], redis_server)
        with running(env) as one, running(env) as two:
            async with (
                LoraRouterClient(one.target, max_attempts=1) as a,
                LoraRouterClient(two.target, max_attempts=1) as b,
            ):
                await register(a, "slow-a")
                await register(a, "slow-bad", source="/adapters/slow-bad")
                # Router two's routes must come while router one's load is under way: from
                # the load reaching vLLM (awaited, not guessed with a sleep), a route
                # through the local router two has 2 s.
                vllm.lora_load_delay_s = 2.0
                loads = "/v1/load_lora_adapter"
                loading = asyncio.create_task(route(a, "slow-a"))
                await eventually(lambda: len(vllm.requests_to(loads)) == 1, "no load began")
                warm = await route(b, "slow-a")
                # Router two answers once the adapter is there, not when Redis says resident.
                assert "slow-a" in vllm.loaded_adapters
                assert not warm.loaded and (await loading).loaded
                assert len(vllm.requests_to("/v1/load_lora_adapter")) == 1

                # A load that fails fails the routes waiting for it in the other router too.
                vllm.missing_lora_paths.add("/adapters/slow-bad")
                failing = asyncio.create_task(route(a, "slow-bad"))
                await eventually(lambda: len(vllm.requests_to(loads)) == 2, "no load began")
                error = await rpc_error(route(b, "slow-bad"))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                details = error.details() or ""
                assert "slow-bad" in details and "vllm-w" in details and "failed" in details
                assert (await rpc_error(failing)).code() == grpc.StatusCode.FAILED_PRECONDITION
                state = (await replicas(a))["vllm-w"]
                assert (list(state.resident_adapters), state.in_flight) == (["slow-a"], 2)


async def test_routing_goes_on_while_redis_is_down(
    lora_dsn: str, lorax: FakeOpenAI, redis_server: EmbeddedRedis
) -> None:
    env = router_env(lora_dsn, [replica("rd-0", lorax), replica("rd-1", lorax)], redis_server)
    with running(env) as server:
        async with LoraRouterClient(server.target, max_attempts=1) as client:
            for name in ("rd-a", "rd-b"):
                await register(client, name)
            home = (await route(client, "rd-a")).replica.name
            redis_server.stop()
            try:
                # Each call has the client's 30 s deadline: one that waited on Redis for
                # good would fail with DEADLINE_EXCEEDED; these succeed without Redis.
                # Affinity survives: the per-process state mirrored Redis's decisions.
                warm = await route(client, "rd-a")
                assert not warm.loaded and warm.replica.name == home
                cold = await route(client, "rd-b")
                assert cold.loaded
                release = lora_pb2.ReleaseRouteRequest(route_id=cold.route_id)
                assert (await client.stub.ReleaseRoute(release)).released
                assert len(await replicas(client)) == 2
                assert (
                    metric(server, "daert_redis_errors_total", service="lora", operation="route")
                    >= 2
                )
            finally:
                redis_server.start()
            assert (await route(client, "rd-a")).reason == EXPLICIT


async def test_postgres_down_is_unavailable_fast_and_recovers(
    tmp_path: Path, lorax: FakeOpenAI
) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pgdata")
    dsn = postgres.start()
    try:
        env = router_env(dsn, [replica("pg-0", lorax)], None)
        with running(env) as server:
            async with LoraRouterClient(server.target, max_attempts=1) as client:
                await register(client, "pg-a")
                postgres.stop()
                # UNAVAILABLE from the 2 s connect timeout (router_env), not DEADLINE_EXCEEDED
                # at the client's 30 s deadline, which is what a hang would give.
                error = await rpc_error(route(client, "pg-a"))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                server.wait_health("NOT_SERVING", timeout_s=10)
                postgres.start()
                server.wait_health("SERVING", timeout_s=15)
                assert (await route(client, "pg-a")).reason == EXPLICIT
    finally:
        postgres.stop()
