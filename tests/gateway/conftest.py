"""A gateway in front of real services: a generation server on a fake vLLM and a fake
Ollama (the one part that cannot run here at speed), the real embedding and rerank servers,
API keys in the real PostgreSQL, limits in the real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from daert.gateway.keys import KeyStore
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess

from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI

CHAT_MODEL = "chat-model"
# The same server, configured as a model whose chat template has no tools.
NO_TOOLS_MODEL = "no-tools-model"
# A model on Ollama, whose API (as the generation service speaks it) has no log probabilities.
OLLAMA_MODEL = "ollama-model"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# A port nothing listens on: the LoRA router is not part of these tests.
NO_SERVICE = "127.0.0.1:9"


@pytest.fixture(scope="session")
def fake_vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["fake/vllm-model"], max_model_len=4096) as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset_fake(fake_vllm: FakeOpenAI, fake_ollama: FakeOllama) -> None:
    fake_vllm.reset()
    fake_ollama.reset()


@pytest.fixture(scope="session")
def generation_server(fake_vllm: FakeOpenAI, fake_ollama: FakeOllama) -> Iterator[ServerProcess]:
    models = [
        {
            "name": CHAT_MODEL,
            "backend": "openai",
            "url": fake_vllm.url,
            "upstream_model": "fake/vllm-model",
            "context_length": 4096,
            "supports_structured_output": True,
        },
        {
            "name": NO_TOOLS_MODEL,
            "backend": "openai",
            "url": fake_vllm.url,
            "upstream_model": "fake/vllm-model",
            "supports_tools": False,
        },
        {
            "name": OLLAMA_MODEL,
            "backend": "ollama",
            "url": fake_ollama.url,
            "upstream_model": "llama3.2",
        },
    ]
    env = {"DAERT_GENERATION_MODELS": json.dumps(models), "DAERT_GENERATION_RETRY_ATTEMPTS": "1"}
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        yield server


def gateway_env(
    postgres: EmbeddedPostgres, redis: EmbeddedRedis | None, **targets: str
) -> dict[str, str]:
    env = {
        "DAERT_GATEWAY_DSN": postgres.dsn,
        "DAERT_GATEWAY_REDIS_URL": redis.url if redis else "",
        # Revocations in these tests take effect at once.
        "DAERT_GATEWAY_KEY_CACHE_S": "0",
        "DAERT_LORA_TARGET": NO_SERVICE,
        "DAERT_CONTEXT_TARGET": NO_SERVICE,
        "DAERT_RETRIEVAL_TARGET": NO_SERVICE,
        "DAERT_RERANK_TARGET": NO_SERVICE,
    }
    env.update({f"DAERT_{name.upper()}_TARGET": target for name, target in targets.items()})
    return env


@pytest.fixture(scope="session")
def gateway_server(
    postgres: EmbeddedPostgres,
    redis_server: EmbeddedRedis,
    generation_server: ServerProcess,
    embedding_server: ServerProcess,
    rerank_server: ServerProcess,
) -> Iterator[ServerProcess]:
    env = gateway_env(
        postgres,
        redis_server,
        generation=generation_server.target,
        embedding=embedding_server.target,
        rerank=rerank_server.target,
    )
    with ServerProcess("gateway", env) as server:
        yield server


@dataclass(frozen=True)
class Keys:
    """Creates API keys in the gateway's key store (as `daert keys create` does)."""

    dsn: str

    def create(self, tenant: str = "acme", **limits: Any) -> str:
        async def create() -> str:
            store = KeyStore(self.dsn)
            await store.open()
            try:
                token, _ = await store.create(tenant=tenant, name="test", **limits)
            finally:
                await store.close()
            return token

        return asyncio.run(create())

    def revoke(self, token: str) -> None:
        async def revoke() -> None:
            store = KeyStore(self.dsn)
            await store.open()
            try:
                key = await store.authenticate(token)
                assert key is not None
                await store.revoke(key.id)
            finally:
                await store.close()

        asyncio.run(revoke())


@pytest.fixture(scope="session")
def keys(postgres: EmbeddedPostgres) -> Keys:
    return Keys(postgres.dsn)


@pytest.fixture(scope="session")
def api_key(keys: Keys) -> str:
    return keys.create("acme")
