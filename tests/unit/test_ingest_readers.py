"""Readers: every format of the fixture corpus, and the files that must fail or be skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from daert.ingest.errors import DocumentFailed, DocumentSkipped
from daert.ingest.readers import ParsedDocument, read

from tests.ingest_corpus import PDF_PAGES, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _read(path: Path, content_type: str | None = None) -> ParsedDocument:
    return read(path.read_bytes(), path.name, content_type)


def test_markdown_headings_path_and_title(corpus: dict[str, Path]) -> None:
    parsed = _read(corpus["markdown"])
    assert parsed.title == "Deploying the stack"
    assert parsed.markdown
    assert [s.headings for s in parsed.sections] == [
        ("Deploying the stack",),
        ("Deploying the stack", "Prerequisites"),
        ("Deploying the stack", "Prerequisites", "Storage"),
        ("Deploying the stack", "Installing"),
    ]
    # Heading lines are in the path, not in the text.
    assert parsed.sections[2].text.startswith("A default storage class")
    assert all("#" not in s.text for s in parsed.sections)


def test_markdown_without_h1_is_titled_by_file_name() -> None:
    parsed = read(b"intro\n\n## Usage\n\nrun it\n\n- # not a heading of the document\n", "x.md")
    assert parsed.title == "x.md"
    assert [s.headings for s in parsed.sections] == [(), ("Usage",)]


def test_plain_text(corpus: dict[str, Path]) -> None:
    parsed = _read(corpus["text"])
    assert parsed.title == "notes.txt"
    assert not parsed.markdown
    [section] = parsed.sections
    assert "reciprocal rank fusion" in section.text and section.page is None


def test_html_main_text_without_boilerplate(corpus: dict[str, Path]) -> None:
    parsed = _read(corpus["html"])
    assert parsed.title == "Rotating API keys"
    text = "\n".join(s.text for s in parsed.sections)
    assert "rotated every ninety days" in text
    for boilerplate in ("Pricing", "Blog navigation", "site banner", "All rights reserved"):
        assert boilerplate not in text
    assert [s.headings for s in parsed.sections] == [
        ("Rotating API keys",),
        ("Rotating API keys", "Creating the new key"),
        ("Rotating API keys", "Revoking the old key"),
    ]


def test_html_by_content_type_without_suffix(corpus: dict[str, Path]) -> None:
    data = corpus["html"].read_bytes()
    assert read(data, "keys", "text/html; charset=utf-8").title == "Rotating API keys"


def test_pdf_one_section_per_page(corpus: dict[str, Path]) -> None:
    parsed = _read(corpus["pdf"])
    assert parsed.title == "Annual report"
    assert [s.page for s in parsed.sections] == [1, 2]
    for section, expected in zip(parsed.sections, PDF_PAGES, strict=True):
        assert " ".join(section.text.split()) == expected


def test_docx_headings_paragraphs_and_tables(corpus: dict[str, Path]) -> None:
    parsed = _read(corpus["docx"])
    assert parsed.title == "Employee handbook"
    assert [s.headings for s in parsed.sections] == [
        (),
        ("Leave",),
        ("Leave", "Sick leave"),
        ("Equipment",),
    ]
    assert parsed.sections[0].text.startswith("Welcome to the company")
    assert parsed.sections[3].text == "Laptop | IT department\nPhone | Office manager"


def test_malformed_pdf_fails_with_reason(corpus: dict[str, Path]) -> None:
    with pytest.raises(DocumentFailed, match="malformed PDF"):
        _read(corpus["malformed_pdf"])


def test_broken_docx_fails_with_reason() -> None:
    with pytest.raises(DocumentFailed, match="malformed DOCX"):
        read(b"PK\x03\x04 not really a zip", "x.docx")


def test_binary_is_skipped_with_reason(corpus: dict[str, Path]) -> None:
    with pytest.raises(DocumentSkipped, match="binary"):
        _read(corpus["binary"])


def test_unknown_suffix_is_read_by_content() -> None:
    assert read(b"just some words", "README").sections[0].text == "just some words"
    with pytest.raises(DocumentSkipped, match="NUL"):
        read(b"abc\x00def", "data.dat")
    with pytest.raises(DocumentFailed, match="malformed PDF"):
        read(b"%PDF-1.4 garbage", "download")


def test_empty_document_is_skipped() -> None:
    with pytest.raises(DocumentSkipped, match="no text"):
        read(b"  \n\n ", "empty.txt")
