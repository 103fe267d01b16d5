"""The TEI and Ollama backends against local servers that speak their exact wire formats
(tests/fakes), through a real embedding server process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from daert.clients import EmbeddingClient, field_violations
from daert.testing import ServerProcess
from daert.v1 import embedding_pb2

from tests.fakes import FakeOllama, FakeTEI
from tests.helpers import free_port, models_env


@pytest.fixture(scope="module")
def tei() -> Iterator[FakeTEI]:
    with FakeTEI(dimensions=16, max_input_length=16, max_client_batch_size=4) as fake:
        yield fake


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(models={"all-minilm:latest": 12}, num_ctx=16) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(tei: FakeTEI, ollama: FakeOllama) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "tei-model", "backend": "tei", "url": tei.url},
        {"name": "minilm", "backend": "ollama", "url": ollama.url, "upstream_model": "all-minilm"},
    )
    with ServerProcess("embedding", env) as process:
        process.wait_health("SERVING", timeout_s=30)
        yield process


@pytest.fixture(autouse=True)
def _clean_fakes(tei: FakeTEI, ollama: FakeOllama) -> None:
    for fake in (tei, ollama):
        fake.delay_s = 0
        fake.reset()


async def embed(server: ServerProcess, **fields: object) -> embedding_pb2.EmbedResponse:
    async with EmbeddingClient(server.target) as client:
        return await client.stub.Embed(embedding_pb2.EmbedRequest(**fields))


async def rpc_error(server: ServerProcess, **fields: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(server, **fields)
    return caught.value


async def test_tei_vectors_in_input_order(server: ServerProcess, tei: FakeTEI) -> None:
    texts = [f"sentence {i}" for i in range(10)]
    response = await embed(server, model="tei-model", inputs=texts)
    assert response.dimensions == 16
    for text, vector in zip(texts, response.embeddings, strict=True):
        np.testing.assert_allclose(vector.values, tei.vector_for(text), atol=1e-6)
    embed_calls = [r for r in tei.requests if r.path == "/embed"]
    # TEI's max_client_batch_size (4, from /info) splits the batch of 10.
    assert [len(r.json["inputs"]) for r in embed_calls] == [4, 4, 2]
    assert all(r.json["normalize"] is False and r.json["truncate"] is True for r in embed_calls)


async def test_tei_matryoshka(server: ServerProcess, tei: FakeTEI) -> None:
    response = await embed(server, model="tei-model", inputs=["abc"], dimensions=4)
    raw = np.array(tei.vector_for("abc", normalize=False)[:4])
    np.testing.assert_allclose(response.embeddings[0].values, raw / np.linalg.norm(raw), atol=1e-6)


async def test_tei_too_long_without_truncation(server: ServerProcess) -> None:
    error = await rpc_error(
        server, model="tei-model", inputs=["word " * 40], truncation=embedding_pb2.TRUNCATION_NONE
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs" in field_violations(error)
    assert "must have less than 16 tokens" in error.details()


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("Overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Backend", grpc.StatusCode.UNAVAILABLE),
        ("Tokenizer", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_tei_errors_map_to_status_codes(
    server: ServerProcess, tei: FakeTEI, error_type: str, code: grpc.StatusCode
) -> None:
    # More failures than the client's retry budget (4 attempts on UNAVAILABLE).
    tei.fail_next_tei(error_type, f"simulated {error_type}", times=5)
    error = await rpc_error(server, model="tei-model", inputs=["x"])
    assert error.code() == code
    assert f"simulated {error_type}" in error.details()


@pytest.mark.parametrize(("model", "path"), [("tei-model", "/embed"), ("minilm", "/api/embed")])
async def test_an_answer_that_is_not_json_is_unavailable(
    server: ServerProcess, tei: FakeTEI, ollama: FakeOllama, model: str, path: str
) -> None:
    # A proxy in front of the server answers 200 with its own page.
    for fake in (tei, ollama):
        fake.answer_with(path, 200, "<html>upstream maintenance</html>")
    error = await rpc_error(server, model=model, inputs=["x"])
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not JSON" in error.details()
    assert "upstream maintenance" in error.details()


async def test_client_retries_unavailable(server: ServerProcess, tei: FakeTEI) -> None:
    tei.fail_next_tei("Backend", "transient backend hiccup", times=2)
    response = await embed(server, model="tei-model", inputs=["retry me"])
    np.testing.assert_allclose(response.embeddings[0].values, tei.vector_for("retry me"), atol=1e-6)
    assert len(tei.requests_to("/embed")) == 3


async def test_request_id_reaches_the_upstream(server: ServerProcess, tei: FakeTEI) -> None:
    async with EmbeddingClient(server.target) as client:
        await client.stub.Embed(
            embedding_pb2.EmbedRequest(model="tei-model", inputs=["traced"]),
            metadata=(("x-request-id", "upstream-trace-1"),),
        )
    [request] = tei.requests_to("/embed")
    assert request.headers["x-request-id"] == "upstream-trace-1"


async def test_ollama_vectors(server: ServerProcess, ollama: FakeOllama) -> None:
    texts = ["alpha beta", "gamma"]
    response = await embed(server, model="minilm", inputs=texts)
    assert response.dimensions == 12
    for text, vector in zip(texts, response.embeddings, strict=True):
        np.testing.assert_allclose(vector.values, ollama.vector_for(text), atol=1e-6)
    request = next(r for r in ollama.requests if r.path == "/api/embed")
    assert request.json == {"model": "all-minilm", "input": texts, "truncate": True}


async def test_ollama_too_long_without_truncation(server: ServerProcess) -> None:
    error = await rpc_error(
        server, model="minilm", inputs=["w " * 40], truncation=embedding_pb2.TRUNCATION_NONE
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the context length" in error.details()


async def test_ollama_model_removed_upstream_is_not_found(
    server: ServerProcess, ollama: FakeOllama
) -> None:
    ollama.fail_next_ollama(404, 'model "all-minilm" not found, try pulling it first')
    error = await rpc_error(server, model="minilm", inputs=["x"])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "try pulling it first" in error.details()


async def test_list_models_reports_what_the_upstreams_said(server: ServerProcess) -> None:
    async with EmbeddingClient(server.target) as client:
        reply = await client.stub.ListModels(embedding_pb2.EmbeddingServiceListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert (models["tei-model"].backend, models["tei-model"].dimensions) == ("tei", 16)
    assert models["tei-model"].max_input_tokens == 16  # TEI /info max_input_length
    assert (models["minilm"].backend, models["minilm"].dimensions) == ("ollama", 12)
    assert models["minilm"].max_input_tokens == 16  # Ollama /api/show context_length


async def test_unreachable_backend_is_unavailable_fast() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = models_env({"name": "gone", "backend": "tei", "url": dead})
    with ServerProcess("embedding", env) as process:
        await asyncio.sleep(0.5)
        assert process.health() == "NOT_SERVING"
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the refused connection ended the call before
        # the client's 30 s deadline, which is what a hang would give instead.
        error = await rpc_error(process, inputs=["x"])
        assert error.code() == grpc.StatusCode.UNAVAILABLE
