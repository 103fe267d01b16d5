"""LoRA adapters through the gateway: the adapters the key's tenant may use are models of
their own in /v1/models, and a chat completion with one goes through the LoRA router to the
replica serving its base model, which applies it (vLLM: the adapter is the `model`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import openai
import psycopg
import pytest
from daert.clients import LoraRouterClient
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess
from daert.v1 import lora_pb2
from psycopg.conninfo import make_conninfo

from tests.fakes.openai import FakeOpenAI
from tests.gateway.conftest import Keys, gateway_env

BASE = "vllm-base"


@pytest.fixture(scope="module")
def lora_vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=[BASE], enable_lora=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def adapters_gateway(
    postgres: EmbeddedPostgres,
    redis_server: EmbeddedRedis,
    embedding_server: ServerProcess,
    lora_vllm: FakeOpenAI,
) -> Iterator[ServerProcess]:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS gateway_adapters_test WITH (FORCE)")
        conn.execute("CREATE DATABASE gateway_adapters_test")
    replicas = [{"name": "vllm-0", "url": lora_vllm.url, "kind": "vllm", "base_model": BASE}]
    router_env = {
        "DAERT_LORA_DSN": make_conninfo(postgres.dsn, dbname="gateway_adapters_test"),
        "DAERT_LORA_REPLICAS": json.dumps(replicas),
        "DAERT_LORA_REDIS_URL": redis_server.url,
        "DAERT_LORA_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex}:",
        "DAERT_EMBEDDING_TARGET": embedding_server.target,
    }
    with ServerProcess("lora", router_env) as router:
        router.wait_health("SERVING", 60)
        asyncio.run(_register(router.target))
        models = [
            {"name": "on-vllm", "backend": "openai", "url": lora_vllm.url,
             "upstream_model": BASE, "adapters": "router"},
        ]  # fmt: skip
        generation_env = {
            "DAERT_GENERATION_MODELS": json.dumps(models),
            "DAERT_LORA_TARGET": router.target,
        }
        with ServerProcess("generation", generation_env) as generation:
            generation.wait_health("SERVING", 30)
            env = gateway_env(
                postgres,
                redis_server,
                generation=generation.target,
                embedding=embedding_server.target,
                lora=router.target,
            )
            with ServerProcess("gateway", env) as gateway:
                yield gateway


async def _register(target: str) -> None:
    async with LoraRouterClient(target) as client:
        for adapter in (
            lora_pb2.Adapter(name="sql-helper", source="/adapters/sql", base_model=BASE),
            lora_pb2.Adapter(
                name="acme-only", source="/adapters/acme", base_model=BASE, tenants=["acme"]
            ),
        ):
            await client.stub.RegisterAdapter(lora_pb2.RegisterAdapterRequest(adapter=adapter))


def _client(gateway: ServerProcess, keys: Keys, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=keys.create(tenant), max_retries=0)


def test_adapters_are_models_for_their_tenants(adapters_gateway: ServerProcess, keys: Keys) -> None:
    acme = {m.id: m.owned_by for m in _client(adapters_gateway, keys, "acme").models.list()}
    assert acme["sql-helper"] == f"adapter of {BASE}"
    assert acme["acme-only"] == f"adapter of {BASE}"
    assert "on-vllm" in acme
    globex = {m.id for m in _client(adapters_gateway, keys, "globex").models.list()}
    assert "sql-helper" in globex and "acme-only" not in globex


def test_chat_with_an_adapter_runs_it_on_its_replica(
    adapters_gateway: ServerProcess, keys: Keys, lora_vllm: FakeOpenAI
) -> None:
    client = _client(adapters_gateway, keys, "acme")
    reply = client.chat.completions.create(
        model="sql-helper", messages=[{"role": "user", "content": "List the customers."}]
    )
    assert reply.model == "sql-helper" and reply.choices[0].message.content
    loads = lora_vllm.requests_to("/v1/load_lora_adapter")
    assert loads and loads[-1].json == {"lora_name": "sql-helper", "lora_path": "/adapters/sql"}
    assert lora_vllm.requests_to("/v1/chat/completions")[-1].json["model"] == "sql-helper"
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter is not its model
        _client(adapters_gateway, keys, "globex").chat.completions.create(
            model="acme-only", messages=[{"role": "user", "content": "hi"}]
        )
