"""The ingestion DAG end to end with `dag.test()`: real Airflow (metadata in PostgreSQL),
real embedding and retrieval servers, a fixture corpus of every format in nested folders,
and a local HTTP server for URLs. What a second run, a changed file and a deleted file do is
checked against the servers themselves: the embedding service's count of embedded inputs
and the chunks the retrieval service holds."""

from __future__ import annotations

import asyncio
import functools
import http.server
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daert.clients import RetrievalClient
from daert.testing import ServerProcess
from daert.v1 import retrieval_pb2
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families

from tests.dags.conftest import DAGS
from tests.ingest_corpus import write_corpus

pytestmark = pytest.mark.usefixtures("airflow_db", "stack_env")

GOOD = ("markdown", "text", "html", "pdf", "docx", "long")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local web server: /article.html answers, anything else is a 404."""
    root = tmp_path_factory.mktemp("web")
    (root / "article.html").write_text(
        "<html><head><title>Capacity planning</title></head><body><nav>Home | Blog</nav>"
        "<main><article><h1>Capacity planning</h1><p>Plan for quadruple peak traffic so that "
        "a failed zone never overloads the others; measure the peak every quarter.</p>"
        "</article></main><footer>Copyright footer</footer></body></html>"
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_ingest(**conf: Any) -> dict[str, Any]:
    """One run of the DAG as Airflow parses it from dags/; its summary (the last task's
    result)."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS / "ingest_documents.py")).dags["daert_ingest"]
    run = dag.test(run_conf=conf)
    assert run.state == "success", [(ti.task_id, ti.state) for ti in run.get_task_instances()]
    summary: dict[str, Any] = run.get_task_instance("summarize").xcom_pull(task_ids="summarize")
    return summary


def embedded_inputs(server: ServerProcess) -> float:
    """Texts the embedding service has run through its model so far."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(
        sample.value
        for family in families
        if family.name == "daert_batch_size"
        for sample in family.samples
        if sample.name == "daert_batch_size_sum"
    )


def stored(collection: str) -> dict[str, list[retrieval_pb2.Chunk]]:
    """Every chunk of the collection, by the source URI of its document."""

    async def fetch() -> dict[str, list[retrieval_pb2.Chunk]]:
        async with RetrievalClient() as client:
            listed = await client.stub.ListDocuments(
                retrieval_pb2.ListDocumentsRequest(collection=collection, page_size=1000)
            )
            ids = [d.document_id for d in listed.documents]
            if not ids:
                return {}
            reply = await client.stub.Get(
                retrieval_pb2.GetRequest(collection=collection, document_ids=ids)
            )
        by_uri: dict[str, list[retrieval_pb2.Chunk]] = {}
        for chunk in reply.chunks:
            by_uri.setdefault(meta(chunk)["source_uri"], []).append(chunk)
        return by_uri

    return asyncio.run(fetch())


def meta(chunk: retrieval_pb2.Chunk) -> dict[str, Any]:
    return json_format.MessageToDict(chunk.metadata)


def search(collection: str, text: str) -> list[retrieval_pb2.SearchHit]:
    async def call() -> list[retrieval_pb2.SearchHit]:
        async with RetrievalClient() as client:
            reply = await client.stub.Search(
                retrieval_pb2.SearchRequest(collection=collection, query_text=text, top_k=3)
            )
        return list(reply.hits)

    return asyncio.run(call())


def uri_of(path: Path) -> str:
    return path.resolve().as_uri()


def test_every_format_lands_with_its_metadata_bad_documents_are_reported_and_a_rerun_embeds_nothing(
    tmp_path: Path, web: str, embedding_server: ServerProcess
) -> None:
    corpus = write_corpus(tmp_path / "docs")
    source = [str(tmp_path / "docs"), f"{web}/article.html", f"{web}/missing.html"]
    first = run_ingest(
        source=source, collection="corpus_all", metadata={"team": "docs"}, batch_size=3
    )
    assert first["new"] == len(GOOD) + 1, first  # + the web article
    assert first["failed"] + first["skipped"] == 3, first
    reasons = {item["uri"]: item["reason"] for item in first["failures"] + first["skips"]}
    assert set(reasons) == {
        uri_of(corpus["malformed_pdf"]),
        uri_of(corpus["binary"]),
        f"{web}/missing.html",
    }
    assert "404" in reasons[f"{web}/missing.html"]
    assert all(reasons.values())

    chunks = stored("corpus_all")
    assert set(chunks) == {uri_of(corpus[name]) for name in GOOD} | {f"{web}/article.html"}
    assert len(chunks[uri_of(corpus["long"])]) > 3  # long enough for several chunks
    for uri, document in chunks.items():
        positions = sorted(int(meta(c)["position"]) for c in document)
        assert positions == list(range(len(document))), uri
        for chunk in document:
            assert chunk.id == f"{chunk.document_id}#{int(meta(chunk)['position'])}"
            assert meta(chunk)["team"] == "docs" and meta(chunk)["content_hash"]
            assert meta(chunk)["ingested_at"].startswith("20")

    pdf = search("corpus_all", "data centres in Europe")[0].chunk
    assert meta(pdf)["source_uri"] == uri_of(corpus["pdf"]) and meta(pdf)["page"] == 2
    storage = search("corpus_all", "default storage class persistent volume")[0].chunk
    assert meta(storage)["headings"] == ["Deploying the stack", "Prerequisites", "Storage"]
    assert meta(storage)["title"] == "Deploying the stack"
    article = search("corpus_all", "quadruple peak traffic")[0].chunk
    assert meta(article)["title"] == "Capacity planning"
    assert "Copyright" not in article.text and "Home | Blog" not in article.text
    leave = search("corpus_all", "twenty-five days of paid leave")[0].chunk
    assert meta(leave)["source_uri"] == uri_of(corpus["docx"])

    embedded_before = embedded_inputs(embedding_server)
    second = run_ingest(
        source=source, collection="corpus_all", metadata={"team": "docs"}, batch_size=3
    )
    assert (second["new"], second["changed"], second["unchanged"]) == (0, 0, len(GOOD) + 1)
    assert second["chunks_embedded"] == second["chunks_written"] == 0
    assert embedded_inputs(embedding_server) == embedded_before
    assert stored("corpus_all") == chunks  # not even ingested_at was rewritten


def test_a_changed_file_alone_is_embedded_again_and_its_old_chunks_are_gone(
    tmp_path: Path, embedding_server: ServerProcess
) -> None:
    corpus = write_corpus(tmp_path / "docs")
    corpus["docx"].unlink()  # its zip records the time it was written
    run_ingest(source=str(tmp_path / "docs"), collection="corpus_changed")
    before = stored("corpus_changed")

    corpus["markdown"].write_text("# Deploying the stack\n\nUse the kubectl apply command.\n")
    embedded_before = embedded_inputs(embedding_server)
    summary = run_ingest(source=str(tmp_path / "docs"), collection="corpus_changed")
    assert (summary["changed"], summary["new"]) == (1, 0)
    assert summary["unchanged"] == len(GOOD) - 2  # the DOCX is gone, guide.md changed
    after = stored("corpus_changed")
    assert embedded_inputs(embedding_server) - embedded_before == summary["chunks_embedded"]
    assert summary["chunks_embedded"] == len(after[uri_of(corpus["markdown"])]) == 1
    assert "kubectl apply" in after[uri_of(corpus["markdown"])][0].text
    assert not search("corpus_changed", "default storage class")
    for uri in set(before) - {uri_of(corpus["markdown"])}:
        assert after[uri] == before[uri], uri  # the others untouched


def test_sync_mode_deletes_what_left_the_source_and_incremental_mode_does_not(
    tmp_path: Path,
) -> None:
    docs = tmp_path / "docs"
    corpus = write_corpus(docs)
    run_ingest(source=str(docs), collection="corpus_sync")
    shutil.rmtree(docs / "reports")  # the PDF and the DOCX

    kept = run_ingest(source=str(docs), collection="corpus_sync")
    assert kept["deleted"] == 0 and uri_of(corpus["pdf"]) in stored("corpus_sync")

    synced = run_ingest(source=str(docs), collection="corpus_sync", mode="sync")
    assert synced["deleted"] == 2 and synced["new"] == synced["changed"] == 0
    remaining = stored("corpus_sync")
    assert uri_of(corpus["pdf"]) not in remaining and uri_of(corpus["docx"]) not in remaining
    assert uri_of(corpus["markdown"]) in remaining
