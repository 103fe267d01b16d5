"""Generation with `adapters: router`: the real generation service asks the real LoRA router
(PostgreSQL registry, Redis state, the real embedding service for "auto"), then sends the
request to the chosen replica in that replica's own format: a vLLM fake (the adapter is the
`model`, loaded by the router through /v1/load_lora_adapter), a TGI fake standing in for
LoRAX (the adapter's source in `parameters.adapter_id`, where it lies in
`parameters.adapter_source`) and a TGI fake started with one adapter (its name in
`parameters.adapter_id`; any other id fails there)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
from daert.clients import GenerationClient, LoraRouterClient
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import lora_pb2
from psycopg.conninfo import make_conninfo

from tests.fakes.openai import FakeOpenAI
from tests.fakes.tgi import FakeTGI
from tests.integration.generation_support import CHAT_TEMPLATE, models_env, request

SQL = "Write a SQL query that lists the customers with the highest total order value."
SQL_EXAMPLES = [
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "How do I join the orders and customers tables and group the results by country?",
]


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["vllm-base"], enable_lora=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def lorax() -> Iterator[FakeTGI]:
    with FakeTGI() as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    """TGI started with LORA_ADAPTERS=sql-tgi=/data/sql-tgi."""
    with FakeTGI(adapters={"sql-tgi"}, strict_adapters=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def router(
    postgres: EmbeddedPostgres,
    redis_server: EmbeddedRedis,
    embedding_server: ServerProcess,
    vllm: FakeOpenAI,
    lorax: FakeTGI,
    tgi: FakeTGI,
) -> Iterator[ServerProcess]:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS generation_lora_test WITH (FORCE)")
        conn.execute("CREATE DATABASE generation_lora_test")
    replicas = [
        {"name": "vllm-0", "url": vllm.url, "kind": "vllm", "base_model": "vllm-base"},
        {"name": "lorax-0", "url": lorax.url, "kind": "lorax", "base_model": "lorax-base"},
        {"name": "tgi-0", "url": tgi.url, "kind": "tgi", "base_model": "tgi-base",
         "adapters": ["sql-tgi"]},
    ]  # fmt: skip
    env = {
        "DAERT_LORA_DSN": make_conninfo(postgres.dsn, dbname="generation_lora_test"),
        "DAERT_LORA_REPLICAS": json.dumps(replicas),
        "DAERT_LORA_REDIS_URL": redis_server.url,
        "DAERT_LORA_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex}:",
        "DAERT_EMBEDDING_TARGET": embedding_server.target,
    }
    with ServerProcess("lora", env) as server:
        server.wait_health("SERVING", 60)
        yield server


@pytest.fixture(scope="module")
def generation(
    router: ServerProcess, vllm: FakeOpenAI, lorax: FakeTGI, tgi: FakeTGI
) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "on-vllm", "backend": "openai", "url": vllm.url, "upstream_model": "vllm-base",
         "adapters": "router"},
        {"name": "on-lorax", "backend": "tgi", "url": lorax.url, "chat_template": CHAT_TEMPLATE,
         "base_model": "lorax-base", "adapters": "router"},
        {"name": "on-tgi", "backend": "tgi", "url": tgi.url, "chat_template": CHAT_TEMPLATE,
         "base_model": "tgi-base", "adapters": "router"},
    )  # fmt: skip
    env["DAERT_LORA_TARGET"] = router.target
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        yield server


@pytest.fixture(scope="module")
async def registered(router: ServerProcess) -> None:
    async with LoraRouterClient(router.target) as client:
        for name, base, source in (
            ("sql-helper", "vllm-base", "/adapters/sql-helper"),
            ("sql-lorax", "lorax-base", "acme/sql-lora"),
        ):
            adapter = lora_pb2.Adapter(
                name=name,
                source=source,
                base_model=base,
                description="Writes and explains SQL queries for PostgreSQL and MySQL.",
                examples=SQL_EXAMPLES,
            )
            await client.stub.RegisterAdapter(lora_pb2.RegisterAdapterRequest(adapter=adapter))
        for name, base, source in (
            ("lorax-s3", "lorax-base", "s3://adapters/lorax-s3"),
            ("lorax-local", "lorax-base", "/adapters/lorax-local"),
            ("lorax-file", "lorax-base", "file:///adapters/lorax-file"),
            ("sql-tgi", "tgi-base", "/data/sql-tgi"),
        ):
            adapter = lora_pb2.Adapter(name=name, source=source, base_model=base)
            await client.stub.RegisterAdapter(lora_pb2.RegisterAdapterRequest(adapter=adapter))
        private = lora_pb2.Adapter(
            name="acme-only", source="/adapters/acme", base_model="vllm-base", tenants=["acme"]
        )
        await client.stub.RegisterAdapter(lora_pb2.RegisterAdapterRequest(adapter=private))


@pytest.fixture
async def client(generation: ServerProcess, registered: None) -> AsyncIterator[GenerationClient]:
    async with GenerationClient(generation.target, max_attempts=1) as c:
        yield c


async def in_flight(router: ServerProcess) -> int:
    async with LoraRouterClient(router.target) as client:
        reply = await client.stub.ListReplicas(lora_pb2.ListReplicasRequest())
    return sum(r.in_flight for r in reply.replicas)


async def test_auto_on_vllm_loads_the_adapter_and_names_it_as_the_model(
    client: GenerationClient, vllm: FakeOpenAI, router: ServerProcess
) -> None:
    reply = await client.stub.Generate(request("on-vllm", SQL, adapter_id="auto"))
    assert (reply.adapter_id, reply.replica) == ("sql-helper", "vllm-0")
    assert reply.text == vllm.expected_text(SQL)
    loads = vllm.requests_to("/v1/load_lora_adapter")
    assert [r.json for r in loads] == [
        {"lora_name": "sql-helper", "lora_path": "/adapters/sql-helper"}
    ]
    assert vllm.requests_to("/v1/chat/completions")[-1].json["model"] == "sql-helper"
    # Streamed too; the adapter is resident now, so nothing more is loaded.
    messages = [
        m
        async for m in client.stub.GenerateStream(
            request("on-vllm", SQL, adapter_id="auto", stream=True)
        )
    ]
    assert messages[0].adapter_id == messages[-1].adapter_id == "sql-helper"
    assert len(vllm.requests_to("/v1/load_lora_adapter")) == 1
    # Every route was released when its generation ended.
    for _ in range(50):
        if await in_flight(router) == 0:
            break
        await asyncio.sleep(0.1)
    assert await in_flight(router) == 0


async def test_auto_on_lorax_sends_the_adapter_source(
    client: GenerationClient, lorax: FakeTGI
) -> None:
    reply = await client.stub.Generate(request("on-lorax", SQL, adapter_id="auto"))
    assert (reply.adapter_id, reply.replica) == ("sql-lorax", "lorax-0")
    parameters = lorax.requests_to("/generate")[-1].json["parameters"]
    assert (parameters["adapter_id"], parameters["adapter_source"]) == ("acme/sql-lora", "hub")


@pytest.mark.parametrize(
    ("name", "adapter_id", "source"),
    [
        ("lorax-s3", "s3://adapters/lorax-s3", "s3"),
        ("lorax-local", "/adapters/lorax-local", "local"),
        ("lorax-file", "/adapters/lorax-file", "local"),
    ],
)
async def test_lorax_is_told_where_the_adapter_lies(
    client: GenerationClient, lorax: FakeTGI, name: str, adapter_id: str, source: str
) -> None:
    reply = await client.stub.Generate(request("on-lorax", SQL, adapter_id=name))
    assert (reply.adapter_id, reply.replica) == (name, "lorax-0")
    parameters = lorax.requests_to("/generate")[-1].json["parameters"]
    assert (parameters["adapter_id"], parameters["adapter_source"]) == (adapter_id, source)


async def test_tgi_replica_gets_the_adapter_by_its_name(
    client: GenerationClient, tgi: FakeTGI
) -> None:
    # The fake fails any adapter_id it was not started with, such as the source.
    reply = await client.stub.Generate(request("on-tgi", SQL, adapter_id="sql-tgi"))
    assert (reply.adapter_id, reply.replica) == ("sql-tgi", "tgi-0")
    assert reply.text
    parameters = tgi.requests_to("/generate")[-1].json["parameters"]
    assert parameters["adapter_id"] == "sql-tgi" and "adapter_source" not in parameters


async def test_auto_without_a_matching_adapter_uses_the_base_model(
    client: GenerationClient, vllm: FakeOpenAI
) -> None:
    poem = "Compose a haiku about autumn leaves falling."
    reply = await client.stub.Generate(request("on-vllm", poem, adapter_id="auto"))
    assert (reply.adapter_id, reply.replica) == ("", "vllm-0")
    assert vllm.requests_to("/v1/chat/completions")[-1].json["model"] == "vllm-base"


async def test_router_refusals_reach_the_caller(client: GenerationClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("on-vllm", adapter_id="no-such-adapter"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.Generate(request("on-vllm", adapter_id="acme-only", tenant="globex"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = await client.stub.Generate(request("on-vllm", adapter_id="acme-only", tenant="acme"))
    assert reply.adapter_id == "acme-only"


async def test_router_down_is_unavailable(generation: ServerProcess, registered: None) -> None:
    env = dict(generation.env)
    env["DAERT_LORA_TARGET"] = "127.0.0.1:1"  # nothing listens there
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING", 30)
        async with GenerationClient(server.target, max_attempts=1) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.stub.Generate(request("on-vllm", adapter_id="auto"), timeout=15)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            # Requests without an adapter do not need the router.
            reply = await client.stub.Generate(request("on-vllm"))
            assert reply.adapter_id == "" and reply.text
