"""Sources: local folders and globs, file:// and memory:// through fsspec, http(s) through a
real local HTTP server; ids, canonical URIs, and sources that match nothing."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import pytest
from daert.ingest.errors import DocumentFailed, EmptySource, IngestError
from daert.ingest.sources import (
    SourceDocument,
    canonical_entries,
    document_id,
    fetch,
    list_source,
)

from tests.ingest_corpus import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = write_corpus(tmp_path_factory.mktemp("corpus"))
    root = paths["markdown"].parent
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / ".hidden.md").write_text("# not listed")
    return paths


def _uris(documents: list[SourceDocument]) -> list[str]:
    return [d.uri for d in documents]


def test_folder_lists_every_file_recursively_but_hidden_ones(corpus: dict[str, Path]) -> None:
    root = corpus["markdown"].parent
    documents = list_source([str(root)])
    assert _uris(documents) == sorted(p.as_uri() for p in corpus.values())
    assert {d.source for d in documents} == {root.as_uri()}
    assert {d.name for d in documents} >= {"guide.md", "annual.pdf", "handbook.docx"}


def test_glob_and_file_url_and_single_file(corpus: dict[str, Path]) -> None:
    root = corpus["markdown"].parent
    assert _uris(list_source([f"{root}/**/*.pdf"])) == sorted(
        [corpus["pdf"].as_uri(), corpus["malformed_pdf"].as_uri()]
    )
    assert _uris(list_source([f"file://{root}/reports"])) == sorted(
        [corpus["pdf"].as_uri(), corpus["docx"].as_uri()]
    )
    assert _uris(list_source([str(corpus["text"])])) == [corpus["text"].as_uri()]


def test_overlapping_entries_list_each_document_once(corpus: dict[str, Path]) -> None:
    root = corpus["markdown"].parent
    documents = list_source([str(root), f"{root}/reports", str(root)])
    assert len(documents) == len(corpus)
    # A document belongs to the first entry (sorted) that lists it, whatever the order given.
    assert {d.source for d in documents} == {root.as_uri()}


def test_ids_are_stable_and_keyed_by_canonical_uri(corpus: dict[str, Path]) -> None:
    [by_path] = list_source([str(corpus["text"])])
    [by_url] = list_source([corpus["text"].as_uri()])
    assert by_path == by_url
    assert by_path.document_id == document_id(corpus["text"].as_uri())
    assert by_path.document_id.startswith("doc-") and len(by_path.document_id) == 28


async def test_memory_filesystem_through_fsspec() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/ingest-test/a.md": b"# A", "/ingest-test/sub/b.txt": b"bee"})
    documents = list_source(["memory://ingest-test"])
    assert _uris(documents) == ["memory:///ingest-test/a.md", "memory:///ingest-test/sub/b.txt"]
    async with httpx.AsyncClient() as client:
        fetched = await fetch(documents[1], client)
    assert (fetched.data, fetched.content_type) == (b"bee", None)
    fs.rm("/ingest-test", recursive=True)
    async with httpx.AsyncClient() as client:
        with pytest.raises(DocumentFailed, match=r"reading memory:///ingest-test/sub/b\.txt"):
            await fetch(documents[1], client)


@pytest.mark.parametrize("entry", ["/no/such/folder", "memory://nothing-here", "/tmp/*.nope"])
def test_a_source_that_matches_nothing_is_an_error(entry: str) -> None:
    with pytest.raises(EmptySource, match="matches no document"):
        list_source([entry])


def test_one_empty_entry_among_several_is_an_error(corpus: dict[str, Path]) -> None:
    with pytest.raises(EmptySource, match="mistyped"):
        list_source([str(corpus["text"]), "/data/mistyped"])


@pytest.fixture(scope="module")
def web(corpus: dict[str, Path]) -> Iterator[str]:
    """A real HTTP server over the corpus folder (404 for what is not there)."""
    root = corpus["markdown"].parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


async def test_http_urls_are_documents(web: str) -> None:
    documents = list_source([f"{web}/web/keys.html", f"{web}/missing.md"])
    assert [d.name for d in documents] == ["missing.md", "keys.html"]
    assert {d.source for d in documents} == set(_uris(documents))
    async with httpx.AsyncClient() as client:
        page = await fetch(documents[1], client)
        assert b"Rotating API keys" in page.data
        assert page.content_type is not None and page.content_type.startswith("text/html")
        with pytest.raises(DocumentFailed, match="HTTP 404"):
            await fetch(documents[0], client)


async def test_unreachable_url_is_a_document_failure() -> None:
    [document] = list_source(["http://127.0.0.1:9/x.md"])  # discard port: nothing listens
    async with httpx.AsyncClient() as client:
        with pytest.raises(DocumentFailed, match="ConnectError"):
            await fetch(document, client)


def test_canonical_entries() -> None:
    assert canonical_entries(["/data/b", "file:///data/a", "/data/b"]) == [
        "file:///data/a",
        "file:///data/b",
    ]
    assert canonical_entries(["memory://x/y"]) == ["memory:///x/y"]
    assert canonical_entries(["HTTPS://Example.com/a"]) == ["https://example.com/a"]


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(IngestError, match="source 'nope://x'"):
        list_source(["nope://x"])
