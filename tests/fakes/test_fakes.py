"""Sanity tests for the fake TEI / Ollama servers."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from . import FakeOllama, FakeTEI


@pytest.fixture
def tei() -> Iterator[FakeTEI]:
    with FakeTEI() as fake:
        yield fake


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


def _norm(vec: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vec))


# --------------------------------------------------------------------------- base


def test_lifecycle_and_recording() -> None:
    fake = FakeTEI()
    with pytest.raises(RuntimeError):
        _ = fake.url
    with fake:
        assert fake.url.startswith("http://127.0.0.1:")
        r = httpx.post(f"{fake.url}/embed", json={"inputs": "a b"}, headers={"X-Trace": "t1"})
        assert r.status_code == 200
        httpx.get(f"{fake.url}/health")
        method, path, body, headers = fake.requests[0]
        assert (method, path, body) == ("POST", "/embed", {"inputs": "a b"})
        assert headers["x-trace"] == "t1"
        assert [r.path for r in fake.requests] == ["/embed", "/health"]
        assert len(fake.requests_to("/health")) == 1
        fake.reset()
        assert fake.requests == []
    fake.stop()  # idempotent
    with fake:  # restartable
        assert httpx.get(f"{fake.url}/health").status_code == 200


def test_two_fakes_get_distinct_ports() -> None:
    with FakeTEI() as a, FakeOllama() as b:
        assert a.port != b.port


def test_delay_applies_to_inference_only(tei: FakeTEI) -> None:
    # A delayed health check would take the hour: its 30 s timeout only runs out then.
    tei.delay_s = 3600
    assert httpx.get(f"{tei.url}/health", timeout=30).status_code == 200
    tei.delay_s = 0.3
    t0 = time.monotonic()
    assert httpx.post(f"{tei.url}/embed", json={"inputs": "x"}).status_code == 200
    assert time.monotonic() - t0 >= 0.3


def test_lowering_delay_releases_waiting_request(tei: FakeTEI) -> None:
    # Only lowering the delay answers the request within its 60 s timeout. The waits are
    # polls: generous, as only a broken fake waits them out.
    tei.delay_s = 3600
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            httpx.post(f"{tei.url}/embed", json={"inputs": "x"}, timeout=60).status_code
        )
    )
    thread.start()
    assert tei.wait_for_requests(1, timeout=30, path="/embed")
    tei.delay_s = 0
    thread.join(timeout=60)
    assert result == [200]


def test_fail_next_times_and_then_recovers(tei: FakeTEI) -> None:
    tei.fail_next(503, {"error": "boom", "error_type": "Unhealthy"}, times=2)
    tei.fail_next(500, "plain text")
    for _ in range(2):
        r = httpx.post(f"{tei.url}/embed", json={"inputs": "x"})
        assert (r.status_code, r.json()) == (503, {"error": "boom", "error_type": "Unhealthy"})
    r = httpx.post(f"{tei.url}/embed", json={"inputs": "x"})
    assert (r.status_code, r.text) == (500, "plain text")
    assert httpx.post(f"{tei.url}/embed", json={"inputs": "x"}).status_code == 200


def test_fail_next_does_not_hit_health(tei: FakeTEI) -> None:
    tei.fail_next_tei("Overloaded", "Model is overloaded")
    assert httpx.get(f"{tei.url}/health").status_code == 200
    r = httpx.post(f"{tei.url}/embed", json={"inputs": "x"})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}


async def test_disconnect_counted_when_async_client_cancels(tei: FakeTEI) -> None:
    # Longer than the waits: the request can only end by the disconnect, which is then
    # counted while the handler still sleeps, not when it would have answered.
    tei.delay_s = 60
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(client.post(f"{tei.url}/embed", json={"inputs": "x"}))
        assert await asyncio.to_thread(tei.wait_for_requests, 1, 30.0, "/embed")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await asyncio.to_thread(tei.wait_for_disconnects, 1, 30.0)
    assert tei.disconnects == 1


def test_disconnect_counted_on_client_timeout(ollama: FakeOllama) -> None:
    ollama.delay_s = 60  # longer than the wait below: only the disconnect ends the request
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{ollama.url}/api/embed",
            json={"model": "all-minilm", "input": "x"},
            timeout=httpx.Timeout(5.0, read=0.2),
        )
    assert ollama.wait_for_disconnects(1, timeout=30.0)
    assert ollama.disconnects == 1


def test_completed_requests_are_not_disconnects(tei: FakeTEI) -> None:
    for _ in range(3):
        httpx.post(f"{tei.url}/embed", json={"inputs": "x"})
    assert not tei.wait_for_disconnects(1, timeout=0.2)


# ---------------------------------------------------------------------------- TEI


def test_tei_single_and_batch(tei: FakeTEI) -> None:
    r = httpx.post(f"{tei.url}/embed", json={"inputs": "hello world"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-compute-tokens"] == "2"
    assert r.json() == [tei.vector_for("hello world")]
    assert len(r.json()[0]) == 8
    assert abs(_norm(r.json()[0]) - 1) < 1e-5

    r = httpx.post(f"{tei.url}/embed", json={"inputs": ["a", "b", "a"]})
    vecs = r.json()
    assert vecs == [tei.vector_for("a"), tei.vector_for("b"), tei.vector_for("a")]
    assert vecs[0] != vecs[1]


def test_tei_normalize_false_and_determinism(tei: FakeTEI) -> None:
    r = httpx.post(f"{tei.url}/embed", json={"inputs": "x y", "normalize": False})
    assert r.json() == [tei.vector_for("x y", normalize=False)]
    assert abs(_norm(r.json()[0]) - 1) > 1e-3
    with FakeTEI() as other:  # same model id -> same vectors, across instances/processes
        assert other.vector_for("x y") == tei.vector_for("x y")
    with FakeTEI(model_id="other/model", dimensions=4) as other:
        assert len(other.vector_for("x y")) == 4


def test_tei_health_and_info(tei: FakeTEI) -> None:
    r = httpx.get(f"{tei.url}/health")
    assert (r.status_code, r.content) == (200, b"")
    tei.ready = False
    r = httpx.get(f"{tei.url}/health")
    assert r.status_code == 503
    assert r.json() == {"error": "unhealthy", "error_type": "Unhealthy"}
    info = httpx.get(f"{tei.url}/info").json()
    assert info["model_id"] == "fake/tei-model"
    assert info["max_input_length"] == 16
    assert info["max_client_batch_size"] == 32
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}


def test_tei_empty_inputs(tei: FakeTEI) -> None:
    r = httpx.post(f"{tei.url}/embed", json={"inputs": []})
    assert r.status_code == 400
    assert r.json() == {"error": "`inputs` cannot be empty", "error_type": "Empty"}
    r = httpx.post(f"{tei.url}/embed", json={"inputs": ""})
    assert r.status_code == 400
    assert r.json() == {
        "error": "Input validation error: `inputs` cannot be empty",
        "error_type": "Empty",
    }


def test_tei_batch_too_large() -> None:
    with FakeTEI(max_client_batch_size=2) as tei:
        r = httpx.post(f"{tei.url}/embed", json={"inputs": ["a", "b", "c"]})
        assert r.status_code == 413
        assert r.json() == {
            "error": "batch size 3 > maximum allowed batch size 2",
            "error_type": "Validation",
        }


def test_tei_input_too_long_and_truncation(tei: FakeTEI) -> None:
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    r = httpx.post(f"{tei.url}/embed", json={"inputs": text})
    assert r.status_code == 413
    assert r.json() == {
        "error": "Input validation error: `inputs` must have less than 16 tokens. Given: 20",
        "error_type": "Validation",
    }
    r = httpx.post(f"{tei.url}/embed", json={"inputs": ["ok", text], "truncate": False})
    assert r.status_code == 413
    r = httpx.post(f"{tei.url}/embed", json={"inputs": text, "truncate": True})
    assert r.json() == [tei.vector_for(" ".join(words[:16]))]
    r = httpx.post(
        f"{tei.url}/embed",
        json={"inputs": text, "truncate": True, "truncation_direction": "Left"},
    )
    assert r.json() == [tei.vector_for(" ".join(words[-16:]))]
    with FakeTEI(auto_truncate=True) as auto:
        assert httpx.post(f"{auto.url}/embed", json={"inputs": text}).status_code == 200


def test_tei_too_many_characters(tei: FakeTEI) -> None:
    r = httpx.post(f"{tei.url}/embed", json={"inputs": "x" * 4001})
    assert r.status_code == 413
    assert r.json()["error"] == (
        "Input validation error: `inputs` must have less than 4000 characters. Given: 4001"
    )


def test_tei_prompt_name() -> None:
    with FakeTEI(prompts={"query": "query: "}) as tei:
        r = httpx.post(f"{tei.url}/embed", json={"inputs": "cats", "prompt_name": "query"})
        assert r.json() == [tei.vector_for("query: cats")]
        r = httpx.post(f"{tei.url}/embed", json={"inputs": "cats", "prompt_name": "doc"})
        assert r.status_code == 413
        assert r.json()["error_type"] == "Validation"
        assert 'Available prompts: ["query"]' in r.json()["error"]
    with FakeTEI() as tei:
        r = httpx.post(f"{tei.url}/embed", json={"inputs": "cats", "prompt_name": "query"})
        assert r.status_code == 413
        assert "no prompts were found" in r.json()["error"]


def test_tei_body_rejections_are_plain_text(tei: FakeTEI) -> None:
    r = httpx.post(f"{tei.url}/embed", json={"input": "typo"})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("Failed to deserialize the JSON body into the target type: ")
    assert "missing field `inputs`" in r.text
    r = httpx.post(
        f"{tei.url}/embed", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.text.startswith("Failed to parse the request body as JSON: ")
    r = httpx.post(f"{tei.url}/embed", content=b'{"inputs": "x"}')
    assert r.status_code == 415
    assert r.text == "Expected request with `Content-Type: application/json`"
    with FakeTEI(payload_limit=100) as small:
        r = httpx.post(f"{small.url}/embed", json={"inputs": "x" * 200})
        assert r.status_code == 413
        assert r.headers["content-type"].startswith("text/plain")


def test_tei_overloaded_when_permits_exhausted() -> None:
    with FakeTEI(max_concurrent_requests=1) as tei:
        tei.delay_s = 3600  # the first request holds the permit until released below
        first: list[int] = []
        thread = threading.Thread(
            target=lambda: first.append(
                httpx.post(f"{tei.url}/embed", json={"inputs": "a"}, timeout=60).status_code
            )
        )
        thread.start()
        assert tei.wait_for_requests(1, timeout=30, path="/embed")
        # Polled, not a guessed sleep: the first request has taken the only permit.
        deadline = time.monotonic() + 30
        while not (tei._permits and tei._permits.locked()):
            assert time.monotonic() < deadline, "the first request never took the permit"
            time.sleep(0.01)
        r = httpx.post(f"{tei.url}/embed", json={"inputs": "b"}, timeout=30)
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}
        tei.delay_s = 0
        thread.join(timeout=60)
        assert first == [200]


def test_tei_root_and_invocations_embed(tei: FakeTEI) -> None:
    for path in ("/", "/invocations"):
        r = httpx.post(f"{tei.url}{path}", json={"inputs": "q"})
        assert r.json() == [tei.vector_for("q")]
    assert httpx.get(f"{tei.url}/").status_code == 200  # GET / is a health route


# --------------------------------------------------------------------- TEI rerank


@pytest.fixture
def reranker() -> Iterator[FakeTEI]:
    with FakeTEI(model_type="reranker", max_input_length=8, max_client_batch_size=4) as fake:
        yield fake


def test_tei_rerank_wire_format(reranker: FakeTEI) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    r = httpx.post(f"{reranker.url}/rerank", json={"query": "q w", "texts": texts})
    assert r.status_code == 200
    assert r.headers["x-compute-tokens"] == str(2 * 3 + 2 + 1 + 3)
    assert r.headers["x-compute-characters"] == str(3 * 3 + sum(len(t) for t in texts))
    ranks = r.json()
    assert all(set(rank) == {"index", "score"} for rank in ranks)
    assert sorted(rank["index"] for rank in ranks) == [0, 1, 2]
    assert [rank["score"] for rank in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    for rank in ranks:
        score = reranker.score_for("q w", texts[rank["index"]])
        assert rank["score"] == score and 0 < score < 1
    r = httpx.post(
        f"{reranker.url}/rerank",
        json={"query": "q w", "texts": texts, "raw_scores": True, "return_text": True},
    )
    for rank in r.json():
        assert rank["text"] == texts[rank["index"]]
        assert rank["score"] == reranker.score_for("q w", rank["text"], raw_scores=True)
    assert any(rank["score"] < 0 or rank["score"] > 1 for rank in r.json())


def test_tei_rerank_equal_scores_come_back_in_descending_index_order(reranker: FakeTEI) -> None:
    r = httpx.post(f"{reranker.url}/rerank", json={"query": "q", "texts": ["same"] * 3})
    assert [rank["index"] for rank in r.json()] == [2, 1, 0]


def test_tei_rerank_rejections(reranker: FakeTEI) -> None:
    r = httpx.post(f"{reranker.url}/rerank", json={"query": "q", "texts": []})
    assert (r.status_code, r.json()) == (
        400,
        {"error": "`texts` cannot be empty", "error_type": "Empty"},
    )
    r = httpx.post(f"{reranker.url}/rerank", json={"query": "q", "texts": ["a"] * 5})
    assert (r.status_code, r.json()["error_type"]) == (413, "Validation")
    assert r.json()["error"] == "batch size 5 > maximum allowed batch size 4"
    r = httpx.post(f"{reranker.url}/rerank", json={"texts": ["a"]})
    assert r.status_code == 422 and "missing field `query`" in r.text
    r = httpx.post(f"{reranker.url}/embed", json={"inputs": "x"})
    assert (r.status_code, r.json()) == (
        424,
        {"error": "Backend error: Model is not an embedding model", "error_type": "Backend"},
    )
    with FakeTEI() as embedder:
        r = httpx.post(f"{embedder.url}/rerank", json={"query": "q", "texts": ["a"]})
        assert (r.status_code, r.json()) == (
            424,
            {"error": "Backend error: model is not a re-ranker model", "error_type": "Backend"},
        )


def test_tei_rerank_truncation(reranker: FakeTEI) -> None:
    query, text = "q1 q2 q3", " ".join(f"w{i}" for i in range(10))
    r = httpx.post(f"{reranker.url}/rerank", json={"query": query, "texts": [text]})
    assert r.status_code == 413
    assert r.json()["error"] == (
        "Input validation error: `inputs` must have less than 8 tokens. Given: 13"
    )
    r = httpx.post(
        f"{reranker.url}/rerank", json={"query": query, "texts": [text], "truncate": True}
    )
    # LongestFirst: the longer side (the text) loses words until the pair fits.
    assert r.json()[0]["score"] == reranker.score_for("q1 q2 q3", "w0 w1 w2 w3 w4")
    assert r.headers["x-compute-tokens"] == "8"


def test_tei_reranker_info_routes_and_failures(reranker: FakeTEI) -> None:
    info = httpx.get(f"{reranker.url}/info").json()
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
    for path in ("/", "/invocations"):
        r = httpx.post(f"{reranker.url}{path}", json={"query": "q", "texts": ["a"]})
        assert r.json()[0]["score"] == reranker.score_for("q", "a")
    reranker.fail_next_tei("Overloaded", "Model is overloaded")
    r = httpx.post(f"{reranker.url}/rerank", json={"query": "q", "texts": ["a"]})
    assert r.status_code == 429


# ------------------------------------------------------------------------- Ollama


def test_ollama_embed_single_and_batch(ollama: FakeOllama) -> None:
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": "a b c"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "all-minilm"  # echoes the requested name
    assert body["embeddings"] == [ollama.vector_for("a b c")]
    assert abs(_norm(body["embeddings"][0]) - 1) < 1e-5
    assert body["prompt_eval_count"] == 3
    assert isinstance(body["total_duration"], int) and body["total_duration"] > 0
    assert isinstance(body["load_duration"], int) and body["load_duration"] > 0

    r = httpx.post(
        f"{ollama.url}/api/embed", json={"model": "all-minilm:latest", "input": ["x", "y z"]}
    )
    body = r.json()
    assert body["embeddings"] == [ollama.vector_for("x"), ollama.vector_for("y z")]
    assert body["prompt_eval_count"] == 3


def test_ollama_unknown_model(ollama: FakeOllama) -> None:
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": 'model "nomic-embed-text" not found, try pulling it first'}


def test_ollama_input_too_long(ollama: FakeOllama) -> None:
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    r = httpx.post(
        f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": text, "truncate": False}
    )
    assert r.status_code == 400
    assert r.json() == {"error": "the input length exceeds the context length"}
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": text})
    assert r.status_code == 200  # truncate defaults to true
    assert r.json()["embeddings"] == [ollama.vector_for(" ".join(words[:16]))]
    assert r.json()["prompt_eval_count"] == 16
    r = httpx.post(
        f"{ollama.url}/api/embed",
        json={
            "model": "all-minilm",
            "input": "a b c d",
            "truncate": False,
            "options": {"num_ctx": 3},
        },
    )
    assert r.status_code == 400


def test_ollama_dimensions_and_empty_input(ollama: FakeOllama) -> None:
    r = httpx.post(
        f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": "q", "dimensions": 4}
    )
    vec = r.json()["embeddings"][0]
    assert vec == ollama.vector_for("q", dimensions=4)
    assert len(vec) == 4 and abs(_norm(vec) - 1) < 1e-5
    empties: tuple[str | list[str], ...] = ("", [])
    for empty in empties:
        r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": empty})
        assert (r.status_code, r.json()) == (200, {"model": "all-minilm", "embeddings": []})


def test_ollama_bad_requests(ollama: FakeOllama) -> None:
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": [1, 2]})
    assert (r.status_code, r.json()) == (400, {"error": "invalid input type"})
    r = httpx.post(f"{ollama.url}/api/embed", content=b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
    r = httpx.post(f"{ollama.url}/api/embed", content=b"{oops")
    assert r.status_code == 400 and "error" in r.json()


def test_ollama_tags_version_root() -> None:
    with FakeOllama(models={"all-minilm": 8, "nomic-embed-text:v1.5": 16}) as ollama:
        tags = httpx.get(f"{ollama.url}/api/tags").json()
        names = [m["name"] for m in tags["models"]]
        # embedding models, then the chat models (default: llama3.2)
        assert names == ["all-minilm:latest", "nomic-embed-text:v1.5", "llama3.2:latest"]
        first = tags["models"][0]
        assert set(first) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert len(first["digest"]) == 64
        assert httpx.get(f"{ollama.url}/api/version").json() == {"version": "0.12.6"}
        assert httpx.get(f"{ollama.url}/").text == "Ollama is running"
        r = httpx.post(
            f"{ollama.url}/api/embed", json={"model": "nomic-embed-text:v1.5", "input": "q"}
        )
        assert len(r.json()["embeddings"][0]) == 16


def test_ollama_fail_next(ollama: FakeOllama) -> None:
    ollama.fail_next_ollama(500, "llama runner process has terminated")
    r = httpx.post(f"{ollama.url}/api/embed", json={"model": "all-minilm", "input": "q"})
    assert (r.status_code, r.json()) == (500, {"error": "llama runner process has terminated"})
    assert httpx.get(f"{ollama.url}/api/tags").status_code == 200


async def test_usable_from_async_tests(ollama: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=ollama.url) as client:
        results = await asyncio.gather(
            *(
                client.post("/api/embed", json={"model": "all-minilm", "input": str(i)})
                for i in range(10)
            )
        )
    assert all(r.status_code == 200 for r in results)
    assert len(ollama.requests_to("/api/embed")) == 10
