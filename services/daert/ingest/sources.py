"""Where documents come from: list a source into `SourceDocument`s and fetch their bytes.

Local paths and globs and every fsspec URL (file://, s3://, memory://, ...) go through fsspec
(`url_to_fs`, `glob` / `find`, `cat_file`), so one code path serves them all; http(s) URLs
are fetched with httpx, each URL being one document.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from glob import has_magic
from pathlib import PurePosixPath
from typing import Any

import fsspec.core
import httpx

from daert.ingest.errors import DocumentFailed, EmptySource, IngestError


@dataclass(frozen=True)
class SourceDocument:
    uri: str  # canonical: the same document has the same URI on every run and machine
    document_id: str
    name: str  # for people: the file name or the last part of the URL
    source: str  # the canonical source entry that listed it (stored as `ingest_source`)

    @classmethod
    def from_uri(cls, uri: str, source: str) -> SourceDocument:
        return cls(uri, document_id(uri), _display_name(uri), source)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None  # what an HTTP server said; None for files


def document_id(uri: str) -> str:
    return "doc-" + hashlib.sha256(uri.encode()).hexdigest()[:24]


def _display_name(uri: str) -> str:
    if is_http(uri):
        url = httpx.URL(uri)
        return PurePosixPath(url.path).name or url.host
    return PurePosixPath(uri.split("://", 1)[-1]).name or uri


def is_http(entry: str) -> bool:
    return entry.lower().startswith(("http://", "https://"))


def _filesystem(entry: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for `entry`; IngestError naming it for an unknown
    protocol or one whose package is not installed (s3:// needs s3fs)."""
    try:
        return fsspec.core.url_to_fs(entry)  # type: ignore[no-any-return]
    except (ValueError, ImportError) as exc:
        raise IngestError(f"source {entry!r}: {exc}") from exc


def canonical_entry(entry: str) -> str:
    """One source entry written one way: absolute file:// URLs for local paths, the
    protocol's own form for fsspec URLs, httpx's normal form for http(s)."""
    if is_http(entry):
        return str(httpx.URL(entry))
    fs, path = _filesystem(entry)
    return str(fs.unstrip_protocol(path))


def canonical_entries(entries: Sequence[str]) -> list[str]:
    """The source's entries, canonical, sorted and each once. Each chunk stores the entry its
    document was listed under (`ingest_source`), so "sync" mode deletes only documents that
    came from this source, and adding an entry does not re-tag the others."""
    return sorted({canonical_entry(e) for e in entries})


def _list_entry(entry: str) -> list[str]:
    if is_http(entry):
        return [entry]
    fs, path = _filesystem(entry)
    if has_magic(path):
        found = fs.glob(path, detail=True)
        paths = [p for p, info in found.items() if info["type"] == "file"]
    elif fs.isdir(path):
        # Hidden files and folders (.git, .DS_Store) below the folder are not documents.
        root = path.rstrip("/")
        paths = [
            p
            for p in fs.find(path)
            if not any(part.startswith(".") for part in p[len(root) :].split("/"))
        ]
    else:
        paths = [path] if fs.isfile(path) else []
    return [str(fs.unstrip_protocol(p)) for p in paths]


def list_source(entries: Sequence[str]) -> list[SourceDocument]:
    """Every document of the source, sorted by URI, each once. An entry that matches nothing
    raises EmptySource naming it."""
    sources: dict[str, str] = {}  # uri -> the first entry (in sorted order) that lists it
    for entry in canonical_entries(entries):
        found = _list_entry(entry)
        if not found:
            raise EmptySource(f"source {entry!r} matches no document (check the path)")
        for uri in found:
            sources.setdefault(uri, entry)
    return [SourceDocument.from_uri(uri, sources[uri]) for uri in sorted(sources)]


def _cat(uri: str) -> bytes:
    fs, path = _filesystem(uri)
    return bytes(fs.cat_file(path))


async def fetch(document: SourceDocument, http: httpx.AsyncClient) -> Fetched:
    """The document's bytes; DocumentFailed with the reason when it cannot be read."""
    if is_http(document.uri):
        try:
            response = await http.get(document.uri)
        except httpx.HTTPError as exc:
            raise DocumentFailed(f"fetching {document.uri}: {exc!r}") from exc
        if response.is_error:
            raise DocumentFailed(f"fetching {document.uri}: HTTP {response.status_code}")
        return Fetched(response.content, response.headers.get("content-type"))
    try:
        return Fetched(await asyncio.to_thread(_cat, document.uri), None)
    except OSError as exc:  # fsspec maps missing files and permissions to OSError
        raise DocumentFailed(f"reading {document.uri}: {exc}") from exc


def documents_from_dicts(rows: Sequence[dict[str, Any]]) -> list[SourceDocument]:
    """SourceDocuments back from their XCom form (`to_dict`)."""
    return [SourceDocument(**row) for row in rows]
