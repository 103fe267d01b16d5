"""The rerank service end to end: real server processes serving the embedded default (the
all-MiniLM-L6-v2 embedding cosine fused with BM25), a cross-encoder built here with random
weights (loaded and scored by the real sentence-transformers path, compared with `CrossEncoder`
in this process), and TEI's `/rerank` through a local server speaking its wire format."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from daert.clients import RerankClient, field_violations
from daert.rerank.testing import build_cross_encoder
from daert.testing import ServerProcess
from daert.v1 import rerank_pb2

from tests.fakes import TEI_STATUS, FakeTEI
from tests.helpers import free_port

QUERY = "How do I rotate my API keys?"
DOCUMENTS = [
    "The cat sat on the mat in the afternoon sun.",
    "To rotate API keys, open Settings, then Security, and click Regenerate key.",
    "Airflow schedules the ingestion DAG every hour.",
    "PostgreSQL stores vectors with the pgvector extension.",
]
RELEVANT = 1
# Longer than the tiny cross-encoder's 32 tokens, so the pair is truncated.
LONG_DOCUMENT = " ".join(["security settings keys"] * 20)
DEFAULT = "minilm-bm25"
TINY_MAX_TOKENS = 32


def models_env(*models: dict[str, object], **settings: str) -> dict[str, str]:
    """DAERT_RERANK_MODELS for the given model entries, plus other DAERT_RERANK_* values."""
    env = {"DAERT_RERANK_MODELS": json.dumps(list(models))}
    env.update({f"DAERT_RERANK_{name.upper()}": value for name, value in settings.items()})
    return env


async def rerank(server: ServerProcess, **fields: Any) -> rerank_pb2.RerankResponse:
    async with RerankClient(server.target) as client:
        response: rerank_pb2.RerankResponse = await client.stub.Rerank(
            rerank_pb2.RerankRequest(**fields)
        )
        return response


async def rpc_error(server: ServerProcess, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rerank(server, **fields)
    return caught.value


def by_index(response: rerank_pb2.RerankResponse) -> dict[int, float]:
    return {r.index: r.score for r in response.results}


def assert_best_first_ties_in_order(response: rerank_pb2.RerankResponse) -> None:
    keys = [(-r.score, r.index) for r in response.results]
    assert keys == sorted(keys)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT cross-encoder with random weights, saved like any published model."""
    folder = tmp_path_factory.mktemp("cross-encoder") / "tiny"
    words = " ".join([QUERY, *DOCUMENTS, LONG_DOCUMENT]).replace(",", " ").split()
    build_cross_encoder(folder, words=words)
    return folder


@pytest.fixture(scope="module")
def logits_cross_encoder(cross_encoder: Path) -> Path:
    """The same weights, saved as many published rerankers are: with sentence-transformers'
    Identity activation, so that `CrossEncoder.predict` returns raw logits."""
    folder = cross_encoder.with_name("tiny-logits")
    shutil.copytree(cross_encoder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference_cross_encoder(cross_encoder: Path):  # type: ignore[no-untyped-def]
    """The same model loaded in this process by sentence-transformers itself."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder), max_length=TINY_MAX_TOKENS, device="cpu")


@pytest.fixture(scope="module")
def server(cross_encoder: Path, logits_cross_encoder: Path) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": DEFAULT},
        {"name": "minilm-cosine", "lexical_weight": 0},
        {"name": "minilm-bm25-only", "lexical_weight": 1},
        {
            "name": "tiny-ce",
            "backend": "cross-encoder",
            "path": str(cross_encoder),
            "max_input_tokens": TINY_MAX_TOKENS,
        },
        {"name": "tiny-ce-logits", "backend": "cross-encoder", "path": str(logits_cross_encoder)},
    )
    with ServerProcess("rerank", env) as process:
        process.wait_health("SERVING")
        yield process


# --------------------------------------------------------------------- cross-encoder


async def test_cross_encoder_scores_equal_in_process_cross_encoder(
    server: ServerProcess, reference_cross_encoder: object
) -> None:
    documents = [*DOCUMENTS, LONG_DOCUMENT]
    response = await rerank(server, query=QUERY, documents=documents, model="tiny-ce")
    pairs = [(QUERY, d) for d in documents]
    expected = reference_cross_encoder.predict(pairs, show_progress_bar=False)  # type: ignore[attr-defined]
    assert response.model == "tiny-ce"
    assert sorted(by_index(response)) == list(range(len(documents)))
    for index, score in by_index(response).items():
        assert score == pytest.approx(float(expected[index]), abs=1e-6)
        assert 0 <= score <= 1
    assert_best_first_ties_in_order(response)
    tokenizer = reference_cross_encoder.tokenizer  # type: ignore[attr-defined]
    lengths = [len(tokenizer(q, d)["input_ids"]) for q, d in pairs]
    assert max(lengths) > TINY_MAX_TOKENS  # the long document was truncated ...
    assert response.usage.prompt_tokens == sum(min(n, TINY_MAX_TOKENS) for n in lengths)
    assert response.usage.total_tokens == response.usage.prompt_tokens


async def test_cross_encoder_saved_with_raw_logits_still_scores_through_a_sigmoid(
    server: ServerProcess, logits_cross_encoder: Path
) -> None:
    from sentence_transformers import CrossEncoder

    saved = CrossEncoder(str(logits_cross_encoder), device="cpu")
    logits = saved.predict([(QUERY, d) for d in DOCUMENTS], show_progress_bar=False)
    assert not np.allclose(logits, 1 / (1 + np.exp(-logits)))  # raw logits, as saved
    response = await rerank(server, query=QUERY, documents=DOCUMENTS, model="tiny-ce-logits")
    for index, score in by_index(response).items():
        assert score == pytest.approx(1 / (1 + math.exp(-float(logits[index]))), abs=1e-6)


# -------------------------------------------------------------------------- embedded


async def test_embedded_default_puts_the_relevant_document_first(server: ServerProcess) -> None:
    response = await rerank(server, query=QUERY, documents=DOCUMENTS)
    assert response.model == DEFAULT
    assert response.results[0].index == RELEVANT
    assert response.results[0].score > response.results[1].score + 0.1
    assert all(0 <= r.score <= 1 for r in response.results)
    assert_best_first_ties_in_order(response)


async def test_embedded_score_is_the_documented_fusion(
    server: ServerProcess, reference_model: object
) -> None:
    fused, cosine, lexical = [
        by_index(await rerank(server, query=QUERY, documents=DOCUMENTS, model=name))
        for name in (DEFAULT, "minilm-cosine", "minilm-bm25-only")
    ]
    vectors = reference_model.encode([QUERY, *DOCUMENTS], normalize_embeddings=True)  # type: ignore[attr-defined]
    for index in range(len(DOCUMENTS)):
        want_cosine = float(vectors[0] @ vectors[index + 1])
        assert cosine[index] == pytest.approx((want_cosine + 1) / 2, abs=1e-5)
        assert fused[index] == pytest.approx(0.7 * cosine[index] + 0.3 * lexical[index], abs=1e-6)
    # BM25 normalised by the best document; no shared term ("cat", "Airflow") scores 0.
    assert lexical[RELEVANT] == 1.0
    assert lexical[0] == lexical[2] == 0.0


async def test_embedded_usage_counts_each_text_once(
    server: ServerProcess, reference_model: object
) -> None:
    documents = [*DOCUMENTS, DOCUMENTS[0]]
    response = await rerank(server, query=QUERY, documents=documents)
    tokenizer = reference_model.tokenizer  # type: ignore[attr-defined]
    texts = [QUERY, *DOCUMENTS]  # the repeated document is embedded once
    assert response.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)


# ---------------------------------------------------------------------- request shape


@pytest.mark.parametrize("model", [DEFAULT, "tiny-ce"])
async def test_ties_keep_request_order(server: ServerProcess, model: str) -> None:
    documents = ["rotate the API keys", "same text", "the cat", "same text", "same text"]
    response = await rerank(server, query=QUERY, documents=documents, model=model)
    same = [r for r in response.results if documents[r.index] == "same text"]
    assert [r.index for r in same] == [1, 3, 4]
    assert len({r.score for r in same}) == 1
    assert_best_first_ties_in_order(response)


async def test_top_n_and_return_documents(server: ServerProcess) -> None:
    full = await rerank(server, query=QUERY, documents=DOCUMENTS)
    top = await rerank(server, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    assert [(r.index, r.score) for r in top.results] == [
        (r.index, r.score) for r in full.results[:2]
    ]
    assert [r.document for r in top.results] == [DOCUMENTS[r.index] for r in top.results]
    assert all(r.document == "" for r in full.results)
    everything = await rerank(server, query=QUERY, documents=DOCUMENTS, top_n=10)
    assert len(everything.results) == len(DOCUMENTS)


async def test_list_models(server: ServerProcess) -> None:
    async with RerankClient(server.target) as client:
        reply = await client.stub.ListModels(rerank_pb2.RerankServiceListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert list(models) == [
        DEFAULT,
        "minilm-cosine",
        "minilm-bm25-only",
        "tiny-ce",
        "tiny-ce-logits",
    ]
    assert [name for name, m in models.items() if m.is_default] == [DEFAULT]
    assert all(m.ready and m.max_documents == 1000 for m in models.values())
    assert (models[DEFAULT].backend, models[DEFAULT].max_input_tokens) == ("embedded", 256)
    assert (models["tiny-ce"].backend, models["tiny-ce"].max_input_tokens) == (
        "cross-encoder",
        TINY_MAX_TOKENS,
    )
    assert models["tiny-ce-logits"].max_input_tokens == 128  # max_position_embeddings


@pytest.mark.parametrize("model", [DEFAULT, "tiny-ce"])
async def test_concurrent_calls_each_get_their_own_scores(
    server: ServerProcess, model: str
) -> None:
    queries = [f"question {i}: how do I rotate keys for service {i}?" for i in range(16)]
    documents = [[f"service {i} keys", DOCUMENTS[i % 4], f"doc {i}"] for i in range(16)]
    async with RerankClient(server.target) as client:
        alone = [
            await client.stub.Rerank(rerank_pb2.RerankRequest(query=q, documents=d, model=model))
            for q, d in zip(queries, documents, strict=True)
        ]
        together = await asyncio.gather(
            *(
                client.stub.Rerank(rerank_pb2.RerankRequest(query=q, documents=d, model=model))
                for q, d in zip(queries, documents, strict=True)
            )
        )
    for one, many in zip(alone, together, strict=True):
        assert by_index(many) == pytest.approx(by_index(one), abs=1e-6)


BAD_INPUTS = [
    pytest.param({"documents": ["a"]}, "query", id="no-query"),
    pytest.param({"query": " \n", "documents": ["a"]}, "query", id="blank-query"),
    pytest.param({"query": "q"}, "documents", id="no-documents"),
    pytest.param({"query": "q", "documents": ["a"] * 1001}, "documents", id="too-many"),
    pytest.param({"query": "q", "documents": ["a", ""]}, "documents[1]", id="empty-document"),
    pytest.param({"query": "q", "documents": ["  "]}, "documents[0]", id="blank-document"),
    pytest.param(
        {"query": "q", "documents": ["y" * 600_000, "z" * 600_000]},
        "documents",
        id="too-many-chars",
    ),
    pytest.param({"query": "q", "documents": ["a"], "top_n": -1}, "top_n", id="negative-top-n"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS)
async def test_bad_input_is_rejected_with_the_field_named(
    server: ServerProcess, fields: dict[str, Any], field: str
) -> None:
    error = await rpc_error(server, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    assert field in field_violations(error)
    assert server.health() == "SERVING"


async def test_unknown_model_is_not_found(server: ServerProcess) -> None:
    error = await rpc_error(server, query="q", documents=["a"], model="gpt-9")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in error.details() and DEFAULT in error.details()


def test_grpcurl_through_reflection(server: ServerProcess, grpcurl: Path) -> None:
    body = json.dumps({"query": QUERY, "documents": DOCUMENTS, "topN": 1})
    result = subprocess.run(
        [str(grpcurl), "-plaintext", "-d", body, server.target, "daert.v1.RerankService/Rerank"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    reply = json.loads(result.stdout)
    assert [r.get("index", 0) for r in reply["results"]] == [RELEVANT]
    assert reply["model"] == DEFAULT


# ------------------------------------------------------------------------------- TEI


@pytest.fixture(scope="module")
def tei() -> Iterator[FakeTEI]:
    with FakeTEI(model_type="reranker", max_input_length=16, max_client_batch_size=4) as fake:
        yield fake


@pytest.fixture(scope="module")
def tei_server(tei: FakeTEI) -> Iterator[ServerProcess]:
    env = models_env(
        {"name": "tei-reranker", "backend": "tei", "url": tei.url}, max_document_chars="60"
    )
    with ServerProcess("rerank", env) as process:
        process.wait_health("SERVING", timeout_s=30)
        yield process


@pytest.fixture(autouse=True)
def _clean_tei(request: pytest.FixtureRequest) -> None:
    if "tei" in request.fixturenames:
        fake: FakeTEI = request.getfixturevalue("tei")
        fake.delay_s = 0
        fake.reset()


async def test_tei_wire_format_and_scores(tei_server: ServerProcess, tei: FakeTEI) -> None:
    documents = [f"document number {i} about keys" for i in range(10)]
    response = await rerank(tei_server, query="rotate keys", documents=documents)
    assert response.model == "tei-reranker"
    for index, score in by_index(response).items():
        assert score == pytest.approx(tei.score_for("rotate keys", documents[index]), abs=1e-7)
    assert_best_first_ties_in_order(response)
    calls = tei.requests_to("/rerank")
    # TEI's max_client_batch_size (4, from /info) splits the 10 documents.
    assert [len(r.json["texts"]) for r in calls] == [4, 4, 2]
    assert calls[0].json == {
        "query": "rotate keys",
        "texts": documents[:4],
        "truncate": True,
        "raw_scores": False,
        "return_text": False,
    }
    # Usage: TEI's x-compute-tokens (words here) summed over the pieces.
    assert response.usage.prompt_tokens == 10 * (2 + 5)


async def test_tei_ties_come_back_in_request_order(tei_server: ServerProcess, tei: FakeTEI) -> None:
    # TEI itself returns equal scores in descending index order.
    response = await rerank(tei_server, query="q", documents=["same"] * 3)
    assert [r.index for r in response.results] == [0, 1, 2]


async def test_tei_long_documents_are_cut_but_returned_whole(
    tei_server: ServerProcess, tei: FakeTEI
) -> None:
    long = "word " * 30
    response = await rerank(tei_server, query="q", documents=[long, "short"], return_documents=True)
    [call] = tei.requests_to("/rerank")
    assert call.json["texts"] == [long[:60], "short"]
    assert {r.index: r.document for r in response.results} == {0: long, 1: "short"}


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        *(
            (status, {"error": f"simulated {kind}", "error_type": kind}, code)
            for kind, status, code in [
                ("Overloaded", TEI_STATUS["Overloaded"], grpc.StatusCode.RESOURCE_EXHAUSTED),
                ("Unhealthy", TEI_STATUS["Unhealthy"], grpc.StatusCode.RESOURCE_EXHAUSTED),
                ("Backend", TEI_STATUS["Backend"], grpc.StatusCode.UNAVAILABLE),
                ("Tokenizer", TEI_STATUS["Tokenizer"], grpc.StatusCode.INVALID_ARGUMENT),
                ("Validation", TEI_STATUS["Validation"], grpc.StatusCode.INVALID_ARGUMENT),
                ("Empty", TEI_STATUS["Empty"], grpc.StatusCode.INVALID_ARGUMENT),
            ]
        ),
        (401, "", grpc.StatusCode.FAILED_PRECONDITION),  # --api-key set, none sent
        (404, "Not Found", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_tei_errors_map_to_status_codes(
    tei_server: ServerProcess,
    tei: FakeTEI,
    status: int,
    body: dict[str, str] | str,
    code: grpc.StatusCode,
) -> None:
    # More failures than the client's retry budget (4 attempts on UNAVAILABLE).
    tei.fail_next(status, body, times=5)
    error = await rpc_error(tei_server, query="q", documents=["a"])
    assert error.code() == code
    assert f"TEI answered {status}" in error.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "documents" in field_violations(error)
    tei.reset()
    assert len((await rerank(tei_server, query="q", documents=["a"])).results) == 1


async def test_tei_answer_that_is_not_json_is_unavailable(
    tei_server: ServerProcess, tei: FakeTEI
) -> None:
    tei.answer_with("/rerank", 200, "<html>upstream maintenance</html>")  # a proxy's page
    error = await rpc_error(tei_server, query="q", documents=["a"])
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not JSON" in error.details()


async def test_tei_list_models(tei_server: ServerProcess) -> None:
    async with RerankClient(tei_server.target) as client:
        reply = await client.stub.ListModels(rerank_pb2.RerankServiceListModelsRequest())
    [model] = reply.models
    assert (model.name, model.backend, model.ready, model.is_default) == (
        "tei-reranker",
        "tei",
        True,
        True,
    )
    assert model.max_input_tokens == 16  # TEI /info max_input_length


async def test_not_serving_until_tei_serves_a_reranker() -> None:
    with FakeTEI(model_type="reranker") as upstream, FakeTEI() as embedder:
        upstream.ready = False
        env = models_env(
            {"name": "tei-reranker", "backend": "tei", "url": upstream.url},
            {"name": "tei-embedder", "backend": "tei", "url": embedder.url},
        )
        with ServerProcess("rerank", env) as process:
            await asyncio.sleep(0.5)
            assert process.health() == "NOT_SERVING"
            error = await rpc_error(process, query="q", documents=["a"])
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            upstream.ready = True
            await asyncio.to_thread(process.wait_health, "SERVING", 10)
            async with RerankClient(process.target) as client:
                reply = await client.stub.ListModels(rerank_pb2.RerankServiceListModelsRequest())
            # An embedding model behind TEI is reachable but cannot rerank.
            assert {m.name: m.ready for m in reply.models} == {
                "tei-reranker": True,
                "tei-embedder": False,
            }


async def test_unreachable_tei_is_unavailable_fast() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = models_env({"name": "gone", "backend": "tei", "url": dead})
    with ServerProcess("rerank", env) as process:
        await asyncio.sleep(0.5)
        assert process.health() == "NOT_SERVING"
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the refused connection ended the call before
        # the client's 30 s deadline, which is what a hang would give instead.
        error = await rpc_error(process, query="q", documents=["a"])
        assert error.code() == grpc.StatusCode.UNAVAILABLE
