"""The embedding service end to end: a real server process, called through daert.clients
and through grpcurl (an independent client using server reflection)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import httpx
import numpy as np
import pytest
from daert.clients import EmbeddingClient, field_violations
from daert.testing import ServerProcess
from daert.v1 import embedding_pb2

TEXTS = [
    "The cat sat on the mat.",
    "PostgreSQL stores vectors with the pgvector extension.",
    "Airflow schedules the ingestion DAG every hour.",
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def embed(server: ServerProcess, **fields: object) -> embedding_pb2.EmbedResponse:
    async with EmbeddingClient(server.target) as client:
        return await client.stub.Embed(embedding_pb2.EmbedRequest(**fields))


async def test_vectors_match_in_process_sentence_transformers(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    response = await embed(embedding_server, inputs=TEXTS)
    expected = reference_model.encode(TEXTS)  # type: ignore[attr-defined]
    assert response.model == "all-MiniLM-L6-v2"
    assert response.dimensions == 384
    assert len(response.embeddings) == len(TEXTS)
    for got, want in zip(response.embeddings, expected, strict=True):
        assert len(got.values) == 384
        assert cosine(np.array(got.values), want) >= 0.9999
        assert np.linalg.norm(got.values) == pytest.approx(1.0, abs=1e-5)
    assert response.usage.prompt_tokens > len(TEXTS)


async def test_matryoshka_truncation_is_renormalised(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    response = await embed(embedding_server, inputs=TEXTS, dimensions=64)
    full = reference_model.encode(TEXTS)  # type: ignore[attr-defined]
    assert response.dimensions == 64
    for got, want in zip(response.embeddings, full, strict=True):
        values = np.array(got.values)
        assert values.shape == (64,)
        assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-5)
        assert cosine(values, want[:64]) >= 0.9999


async def test_normalize_false_keeps_raw_truncated_components(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    response = await embed(embedding_server, inputs=TEXTS[:1], dimensions=32, normalize=False)
    want = reference_model.encode(TEXTS[:1])[0][:32]  # type: ignore[attr-defined]
    values = np.array(response.embeddings[0].values)
    np.testing.assert_allclose(values, want, atol=1e-5)
    assert np.linalg.norm(values) < 0.99  # a prefix of a unit vector is shorter than 1


async def test_query_and_document_prefixes(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    text = "how do I rotate my API keys"
    query = await embed(
        embedding_server,
        inputs=[text],
        model="minilm-prefixed",
        input_type=embedding_pb2.INPUT_TYPE_QUERY,
    )
    document = await embed(
        embedding_server,
        inputs=[text],
        model="minilm-prefixed",
        input_type=embedding_pb2.INPUT_TYPE_DOCUMENT,
    )
    want_query, want_doc = reference_model.encode([f"query: {text}", f"passage: {text}"])  # type: ignore[attr-defined]
    assert cosine(np.array(query.embeddings[0].values), want_query) >= 0.9999
    assert cosine(np.array(document.embeddings[0].values), want_doc) >= 0.9999
    assert cosine(np.array(query.embeddings[0].values), want_doc) < 0.999


async def test_list_models(embedding_server: ServerProcess) -> None:
    async with EmbeddingClient(embedding_server.target) as client:
        reply = await client.stub.ListModels(embedding_pb2.EmbeddingServiceListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert list(models) == ["all-MiniLM-L6-v2", "minilm-prefixed"]
    default = models["all-MiniLM-L6-v2"]
    assert (default.dimensions, default.max_input_tokens) == (384, 256)
    assert default.backend == "sentence-transformers"
    assert default.is_default and default.ready
    assert not models["minilm-prefixed"].is_default


async def test_concurrent_calls_each_get_their_own_vectors(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    texts = [f"document number {i} talks about topic {i % 7}" for i in range(48)]
    async with EmbeddingClient(embedding_server.target) as client:
        vectors = await asyncio.gather(*(client.embed_texts([t]) for t in texts))
    expected = reference_model.encode(texts)  # type: ignore[attr-defined]
    for got, want in zip(vectors, expected, strict=True):
        assert cosine(np.array(got[0]), want) >= 0.9999


def test_grpcurl_through_reflection(embedding_server: ServerProcess, grpcurl: object) -> None:
    listing = subprocess.run(
        [str(grpcurl), "-plaintext", embedding_server.target, "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert "daert.v1.EmbeddingService" in listing
    assert "grpc.health.v1.Health" in listing
    body = json.dumps({"inputs": ["hello world"], "dimensions": 8})
    result = subprocess.run(
        [
            str(grpcurl),
            "-plaintext",
            "-d",
            body,
            embedding_server.target,
            "daert.v1.EmbeddingService/Embed",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    reply = json.loads(result.stdout)
    assert reply["dimensions"] == 8
    assert len(reply["embeddings"][0]["values"]) == 8


BAD_INPUTS = [
    pytest.param({"inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "inputs", id="no-inputs"),
    pytest.param({"inputs": ["ok", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]", id="empty"),
    pytest.param({"inputs": ["   \n"]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]", id="blank"),
    pytest.param(
        {"inputs": ["x"] * 257}, grpc.StatusCode.INVALID_ARGUMENT, "inputs", id="too-many"
    ),
    pytest.param(
        {"inputs": ["y" * 600_000, "z" * 600_000]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs",
        id="too-many-chars",
    ),
    pytest.param(
        {"inputs": ["ok"], "dimensions": -1},
        grpc.StatusCode.INVALID_ARGUMENT,
        "dimensions",
        id="negative-dimensions",
    ),
    pytest.param(
        {"inputs": ["ok"], "dimensions": 385},
        grpc.StatusCode.INVALID_ARGUMENT,
        "dimensions",
        id="too-many-dimensions",
    ),
    pytest.param(
        {"inputs": ["word " * 400], "truncation": embedding_pb2.TRUNCATION_NONE},
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0]",
        id="too-long-no-truncation",
    ),
    pytest.param(
        {"inputs": ["ok"], "input_type": 9},
        grpc.StatusCode.INVALID_ARGUMENT,
        "input_type",
        id="unknown-input-type",
    ),
    pytest.param(
        {"inputs": ["ok"], "truncation": 7},
        grpc.StatusCode.INVALID_ARGUMENT,
        "truncation",
        id="unknown-truncation",
    ),
    pytest.param({"inputs": ["ok"], "model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, None, id="model"),
]


@pytest.mark.parametrize(("fields", "code", "field"), BAD_INPUTS)
async def test_bad_input_is_rejected_with_the_field_named(
    embedding_server: ServerProcess,
    fields: dict[str, object],
    code: grpc.StatusCode,
    field: str | None,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(embedding_server, **fields)
    assert caught.value.code() == code
    if field is not None:
        assert caught.value.details().startswith(f"{field}: ")
        assert field in field_violations(caught.value)
    assert embedding_server.health() == "SERVING"
    ok = await embed(embedding_server, inputs=["still fine"])
    assert len(ok.embeddings) == 1


async def test_over_long_input_is_truncated_by_default(embedding_server: ServerProcess) -> None:
    response = await embed(embedding_server, inputs=["word " * 400])
    assert response.usage.prompt_tokens == 256


async def test_cancelled_call_leaves_the_batcher_healthy(
    embedding_server: ServerProcess, reference_model: object
) -> None:
    async with EmbeddingClient(embedding_server.target) as client:
        big = embedding_pb2.EmbedRequest(inputs=[f"long text {i} " * 40 for i in range(256)])
        call = client.stub.Embed(big)
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        got = await client.embed_texts(TEXTS, timeout_s=30)
    expected = reference_model.encode(TEXTS)  # type: ignore[attr-defined]
    for vector, want in zip(got, expected, strict=True):
        assert cosine(np.array(vector), want) >= 0.9999


async def test_expired_deadline_gives_deadline_exceeded(embedding_server: ServerProcess) -> None:
    async with EmbeddingClient(embedding_server.target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.Embed(
                embedding_pb2.EmbedRequest(inputs=[f"text {i} " * 40 for i in range(256)]),
                timeout=0.01,
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert embedding_server.health() == "SERVING"


async def test_invalid_utf8_on_the_wire_is_invalid_argument_naming_the_field(
    embedding_server: ServerProcess,
) -> None:
    # Found by tests/fuzz: inputs[0] = "x", a lone surrogate (U+D800 as UTF-8), "y" was
    # answered UNKNOWN ("Unexpected DecodeError") by grpc before any servicer saw it.
    async with grpc.aio.insecure_channel(embedding_server.target) as channel:
        embed = channel.unary_unary(
            "/daert.v1.EmbeddingService/Embed",
            request_serializer=lambda raw: raw,
            response_deserializer=embedding_pb2.EmbedResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(b"\n\x05x\xed\xa0\x80y", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(caught.value)) == ["inputs[0]"]
    assert embedding_server.health() == "SERVING"


async def test_request_id_is_logged_and_returned(embedding_server: ServerProcess) -> None:
    async with EmbeddingClient(embedding_server.target) as client:
        call = client.stub.Embed(
            embedding_pb2.EmbedRequest(inputs=["trace me"]),
            metadata=(("x-request-id", "req-test-1234"),),
        )
        await call
        trailer = await call.trailing_metadata()
    assert trailer["x-request-id"] == "req-test-1234"
    for _ in range(50):
        entries = [e for e in embedding_server.logs() if e.get("request_id") == "req-test-1234"]
        if entries:
            break
        await asyncio.sleep(0.05)
    assert entries[0]["method"] == "/daert.v1.EmbeddingService/Embed"
    assert entries[0]["code"] == "OK"


async def test_request_id_is_generated_when_absent(embedding_server: ServerProcess) -> None:
    async with EmbeddingClient(embedding_server.target) as client:
        call = client.stub.Embed(embedding_pb2.EmbedRequest(inputs=["no id"]))
        await call
        trailer = await call.trailing_metadata()
    assert len(trailer["x-request-id"]) == 32


async def test_metrics_count_rpcs(embedding_server: ServerProcess) -> None:
    await embed(embedding_server, inputs=["count me"])
    with pytest.raises(grpc.aio.AioRpcError):
        await embed(embedding_server, inputs=[])
    url = f"http://127.0.0.1:{embedding_server.metrics_port}/metrics"
    async with httpx.AsyncClient() as http:
        text = (await http.get(url, timeout=5)).text
    assert 'daert_grpc_requests_total{code="OK",method="Embed",service="embedding"}' in text
    assert 'code="INVALID_ARGUMENT",method="Embed"' in text
    assert "daert_grpc_request_duration_seconds_bucket" in text
    assert "daert_grpc_requests_in_flight" in text
    assert 'daert_batch_size_count{batcher="embedding:all-MiniLM-L6-v2"}' in text
    assert 'daert_backend_ready{service="embedding"} 1.0' in text
