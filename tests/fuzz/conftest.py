"""The real servers the fuzz suite attacks, each with its real backends, started once per
session, and the Hypothesis profiles (`DAERT_FUZZ_PROFILE`: "ci", the default, is
derandomised so CI is reproducible; "fuzz", for `make fuzz`, is random and keeps failing
examples in .hypothesis/)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
from daert.local.llm import MODEL_NAME, EmbeddedLlm, context_tokenizers, generation_models
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.rerank.testing import build_cross_encoder
from daert.testing import ServerProcess
from daert.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    lora_pb2,
    lora_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    sandbox_pb2,
    sandbox_pb2_grpc,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from psycopg.conninfo import make_conninfo

from tests.fakes import FakeOpenAI
from tests.fuzz.strategies import Overrides, known
from tests.helpers import REPO
from tests.integration.test_lora_router import BASE, OTHER_BASE, replica, router_env

_BASE = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    print_blob=True,
)
settings.register_profile("ci", _BASE, derandomize=True, database=None)
settings.register_profile(
    "fuzz", _BASE, database=DirectoryBasedExampleDatabase(REPO / ".hypothesis")
)
settings.load_profile(os.environ.get("DAERT_FUZZ_PROFILE", "ci"))

COLLECTIONS = {"fuzz_3d": 3, "fuzz_384d": 384}
ADAPTER = "fuzz-adapter"
TENANT = "fuzz-tenant"  # valid as a retrieval and a lora tenant
SESSION = "fuzz-session"
# Execute is fuzzed on its fields, never with random code: a few fixed programs.
PROGRAMS = [
    "print('hello')",
    "",
    "x = 6 * 7\nx",
    "import sys\nsys.exit(3)",
    "raise ValueError('fuzz')",
    "open('out.txt', 'w').write('data')",
    "import time\ntime.sleep(0.2)",
]


@dataclass
class FuzzTarget:
    """A running server, the values its fields that name things should often take, and a
    step that (re)creates those things before each RPC's examples (a fuzzed delete may have
    removed them). `share` scales the example budget for servers whose calls are slow."""

    server: ServerProcess
    overrides: Overrides = field(default_factory=dict)
    prepare: Callable[[grpc.Channel], None] = lambda channel: None
    share: float = 1.0


def _model_names(server: ServerProcess, stub: Any, request: Any) -> list[str]:
    with grpc.insecure_channel(server.target) as channel:
        reply = stub(channel).ListModels(request, timeout=10)
    return [model.name for model in reply.models]


@pytest.fixture(scope="session")
def embedding_target(embedding_server: ServerProcess) -> FuzzTarget:
    models = _model_names(
        embedding_server,
        embedding_pb2_grpc.EmbeddingServiceStub,
        embedding_pb2.EmbeddingServiceListModelsRequest(),
    )
    return FuzzTarget(embedding_server, {"model": known(models)})


@pytest.fixture(scope="session")
def rerank_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """The embedded hybrid reranker and a tiny cross-encoder (random weights, real code)."""
    cross_encoder = tmp_path_factory.mktemp("fuzz-ce") / "tiny"
    build_cross_encoder(cross_encoder)
    models = [
        {"name": "minilm-bm25"},
        {"name": "tiny-ce", "backend": "cross-encoder", "path": str(cross_encoder)},
    ]
    env = {"DAERT_RERANK_MODELS": json.dumps(models)}
    with ServerProcess("rerank", env) as server:
        server.wait_health("SERVING")
        names = _model_names(
            server, rerank_pb2_grpc.RerankServiceStub, rerank_pb2.RerankServiceListModelsRequest()
        )
        yield FuzzTarget(server, {"model": known(names)})


def _database(postgres: EmbeddedPostgres, name: str) -> str:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return make_conninfo(postgres.dsn, dbname=name)


def _create_collections(channel: grpc.Channel) -> None:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    for name, dimensions in COLLECTIONS.items():
        stub.CreateCollection(
            retrieval_pb2.CreateCollectionRequest(
                collection=name, dimensions=dimensions, if_not_exists=True
            ),
            timeout=10,
        )


@pytest.fixture(scope="session")
def retrieval_target(postgres: EmbeddedPostgres) -> Iterator[FuzzTarget]:
    env = {"DAERT_RETRIEVAL_DSN": _database(postgres, "fuzz_retrieval")}
    with ServerProcess("retrieval", env) as server:
        server.wait_health("SERVING")
        overrides = {"collection": known(list(COLLECTIONS)), "tenant": known(["", TENANT])}
        yield FuzzTarget(server, overrides, _create_collections)


@pytest.fixture(scope="session")
def generation_target(llm_server: EmbeddedLlm) -> Iterator[FuzzTarget]:
    """Generation on the embedded LLM. Hostile max_tokens make calls run to their deadline,
    so this server gets a small share of the budget."""
    env = {"DAERT_GENERATION_MODELS": generation_models(llm_server.url, 1024)}
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        models = _model_names(
            server,
            generation_pb2_grpc.GenerationServiceStub,
            generation_pb2.GenerationServiceListModelsRequest(),
        )
        yield FuzzTarget(server, {"model": known(models)}, share=0.25)


@pytest.fixture(scope="session")
def context_target(
    llm_server: EmbeddedLlm, generation_target: FuzzTarget, embedding_server: ServerProcess
) -> Iterator[FuzzTarget]:
    """Context with the embedded LLM's llama.cpp tokenizer; summaries by that LLM."""
    env = {
        "DAERT_CONTEXT_TOKENIZERS": context_tokenizers(llm_server.url),
        "DAERT_GENERATION_TARGET": generation_target.server.target,
        "DAERT_EMBEDDING_TARGET": embedding_server.target,
    }
    with ServerProcess("context", env) as server:
        server.wait_health("SERVING")
        overrides = {"tokenizer": known([MODEL_NAME]), "summary_model": known([MODEL_NAME])}
        yield FuzzTarget(server, overrides, share=0.5)


def _register_adapter(channel: grpc.Channel) -> None:
    adapter = lora_pb2.Adapter(name=ADAPTER, source=f"/adapters/{ADAPTER}", base_model=BASE)
    lora_pb2_grpc.LoraRouterServiceStub(channel).RegisterAdapter(
        lora_pb2.RegisterAdapterRequest(adapter=adapter, replace=True), timeout=10
    )


@pytest.fixture(scope="session")
def lora_target(
    postgres: EmbeddedPostgres, redis_server: EmbeddedRedis, embedding_server: ServerProcess
) -> Iterator[FuzzTarget]:
    """The router on PostgreSQL, Redis and the embedding service; its LoRAX replicas are only
    probed for health, which a fake answers."""
    with FakeOpenAI(models=[BASE]) as lorax:
        replicas = [replica("lorax-0", lorax), replica("lorax-1", lorax, base=OTHER_BASE)]
        env = router_env(_database(postgres, "fuzz_lora"), replicas, redis_server)
        env["DAERT_EMBEDDING_TARGET"] = embedding_server.target
        with ServerProcess("lora", env) as server:
            server.wait_health("SERVING", timeout_s=60)
            overrides = {
                "name": known([ADAPTER]),
                "adapter": known([ADAPTER, "auto"]),
                "adapter_id": known([ADAPTER]),
                "base_model": known([BASE, OTHER_BASE]),
                "tenant": known([TENANT]),
            }
            yield FuzzTarget(server, overrides, _register_adapter)


def _open_session(channel: grpc.Channel) -> None:
    try:
        sandbox_pb2_grpc.SandboxServiceStub(channel).CreateSession(
            sandbox_pb2.CreateSessionRequest(session_id=SESSION), timeout=10
        )
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


@pytest.fixture(scope="session")
def sandbox_target() -> Iterator[FuzzTarget]:
    if not os.environ.get("DAERT_SANDBOX_PACKAGES_DIR"):
        pytest.fail("DAERT_SANDBOX_PACKAGES_DIR is unset: run the suite with `make test`")
    with ServerProcess("sandbox", {"DAERT_SANDBOX_POOL_SIZE": "2"}) as server:
        server.wait_health("SERVING", timeout_s=60)
        overrides = {"code": st.sampled_from(PROGRAMS), "session_id": known([SESSION])}
        yield FuzzTarget(server, overrides, _open_session, share=0.5)


# Which fixture serves each service: test_fuzz checks that it names every service there is.
TARGETS = {
    "daert.v1.EmbeddingService": "embedding_target",
    "daert.v1.RerankService": "rerank_target",
    "daert.v1.RetrievalService": "retrieval_target",
    "daert.v1.GenerationService": "generation_target",
    "daert.v1.ContextService": "context_target",
    "daert.v1.LoraRouterService": "lora_target",
    "daert.v1.SandboxService": "sandbox_target",
}
