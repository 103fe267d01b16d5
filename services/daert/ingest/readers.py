"""Documents into text sections: bytes and a name in, `ParsedDocument` out.

One reader per format, each leaning on its library: Markdown with markdown-it-py (its
heading tokens give the headings path), HTML with trafilatura (main text only, boilerplate
and navigation stripped, rendered as Markdown so headings survive), PDF with pypdf (one
section per page), DOCX with python-docx (Heading styles give the headings path; paragraphs
and tables in document order), and plain UTF-8 text. The format comes from the file
suffix, else the HTTP content type, else the first bytes. A file that is not something we
read raises DocumentSkipped; a broken one of a format we read raises DocumentFailed.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import docx
import pypdf
import trafilatura
from docx.table import Table
from docx.text.paragraph import Paragraph
from markdown_it import MarkdownIt
from markdown_it.token import Token

from daert.ingest.errors import DocumentFailed, DocumentProblem, DocumentSkipped


@dataclass(frozen=True)
class Section:
    text: str
    headings: tuple[str, ...] = ()  # the enclosing headings, outermost first
    page: int | None = None  # PDF only, from 1


@dataclass(frozen=True)
class ParsedDocument:
    title: str
    sections: list[Section]
    markdown: bool = False  # section text is Markdown (chunked along its structure)


def _text(data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentSkipped(f"binary or not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise DocumentSkipped("binary content (NUL bytes)")
    return text


def _document(title: str, sections: Iterable[Section], *, markdown: bool = False) -> ParsedDocument:
    kept = [s for s in sections if s.text.strip()]
    if not kept:
        raise DocumentSkipped("no text in the document")
    return ParsedDocument(title=title.strip(), sections=kept, markdown=markdown)


def read_text(data: bytes, name: str) -> ParsedDocument:
    return _document(name, [Section(_text(data).strip())])


def _inline_text(inline: Token) -> str:
    return "".join(c.content for c in inline.children or () if c.type in ("text", "code_inline"))


def _markdown(text: str, name: str, title: str | None = None) -> ParsedDocument:
    tokens = MarkdownIt("commonmark").parse(text)
    lines = text.splitlines()
    sections: list[Section] = []
    path: list[tuple[int, str]] = []  # (level, heading) of the enclosing headings
    start = 0
    for index, token in enumerate(tokens):
        # Top-level headings only: a "#" line inside a list or quote does not open a section.
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        headings = tuple(h for _, h in path)
        sections.append(Section("\n".join(lines[start : token.map[0]]).strip(), headings))
        level, heading = int(token.tag[1:]), _inline_text(tokens[index + 1])
        if title is None and level == 1:
            title = heading
        path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, heading)]
        start = token.map[1]
    sections.append(Section("\n".join(lines[start:]).strip(), tuple(h for _, h in path)))
    return _document(title or name, sections, markdown=True)


def read_markdown(data: bytes, name: str) -> ParsedDocument:
    return _markdown(_text(data), name)


def read_html(data: bytes, name: str) -> ParsedDocument:
    tree = trafilatura.load_html(data)
    if tree is None:
        raise DocumentFailed("not parseable as HTML")
    metadata = trafilatura.extract_metadata(tree)
    extracted = trafilatura.extract(
        tree, output_format="markdown", include_comments=False, include_tables=True
    )
    if not extracted:
        raise DocumentSkipped("no main text found in the HTML page")
    title = metadata.title if metadata is not None and metadata.title else None
    return _markdown(extracted, name, title)


def read_pdf(data: bytes, name: str) -> ParsedDocument:
    # pypdf raises many exception types on damaged files, not only PdfReadError.
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentFailed("the PDF is encrypted")
        pages = [page.extract_text() for page in reader.pages]
        title = reader.metadata.title if reader.metadata is not None else None
    except DocumentFailed:
        raise
    except Exception as exc:
        raise DocumentFailed(f"malformed PDF: {exc}") from exc
    sections = [Section(text.strip(), page=number) for number, text in enumerate(pages, 1)]
    return _document(title or name, sections)


def _heading_level(paragraph: Paragraph) -> int | None:
    style = paragraph.style.name if paragraph.style is not None else ""
    if style == "Title":
        return 0
    if style and style.startswith("Heading ") and style[8:].isdigit():
        return int(style[8:])
    return None


def _table_text(table: Table) -> str:
    # Merged cells repeat in python-docx's rows; show each cell once.
    rows = (dict.fromkeys(cell.text.strip() for cell in row.cells) for row in table.rows)
    return "\n".join(" | ".join(cell for cell in row if cell) for row in rows)


def read_docx(data: bytes, name: str) -> ParsedDocument:
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # a damaged zip or package raises several types
        raise DocumentFailed(f"malformed DOCX: {exc}") from exc
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    blocks: list[str] = []
    title = document.core_properties.title or None

    def close_section() -> None:
        body = "\n\n".join(b for b in blocks if b)
        sections.append(Section(body, tuple(h for _, h in path)))
        blocks.clear()

    for block in document.iter_inner_content():
        if isinstance(block, Table):
            blocks.append(_table_text(block))
            continue
        level, text = _heading_level(block), block.text.strip()
        if level is None:
            blocks.append(text)
        elif level == 0:  # the Title style names the document, it is not a section
            title = title or text
        else:
            close_section()
            title = title or (text if level == 1 else None)
            path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, text)]
    close_section()
    return _document(title or name, sections)


Reader = Callable[[bytes, str], ParsedDocument]

DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
_BY_SUFFIX: dict[str, Reader] = {
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".html": read_html,
    ".htm": read_html,
    ".xhtml": read_html,
    ".pdf": read_pdf,
    ".docx": read_docx,
    ".txt": read_text,
    ".text": read_text,
}
_BY_TYPE: dict[str, Reader] = {
    "text/markdown": read_markdown,
    "text/x-markdown": read_markdown,
    "text/html": read_html,
    "application/xhtml+xml": read_html,
    "application/pdf": read_pdf,
    DOCX_TYPE: read_docx,
    "text/plain": read_text,
}


def _sniffed(data: bytes) -> Reader:
    head = data[:512].lstrip().lower()
    if head.startswith(b"%pdf-"):
        return read_pdf
    if head.startswith((b"<!doctype html", b"<html")):
        return read_html
    return read_text  # which skips binary content


def reader_for(data: bytes, name: str, content_type: str | None = None) -> Reader:
    suffix = PurePosixPath(name).suffix.lower()
    media_type = (content_type or "").split(";")[0].strip().lower()
    return _BY_SUFFIX.get(suffix) or _BY_TYPE.get(media_type) or _sniffed(data)


def read(data: bytes, name: str, content_type: str | None = None) -> ParsedDocument:
    """The document's title and sections, or DocumentSkipped / DocumentFailed with a reason."""
    reader = reader_for(data, name, content_type)
    try:
        return reader(data, name)
    except DocumentProblem:
        raise
    except Exception as exc:  # a library's own error on a damaged file: this document's alone
        raise DocumentFailed(f"unreadable: {type(exc).__name__}: {exc}") from exc
