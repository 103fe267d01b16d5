"""A fixture corpus for the ingestion tests: one document of every format we read, in nested
folders, plus files that must fail or be skipped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import docx
from fpdf import FPDF

# A fixed date inside the PDF, so that its bytes (and content hash) do not depend on when
# the corpus was written.
PDF_DATE = datetime(2025, 1, 1, tzinfo=UTC)

MARKDOWN = """\
# Deploying the stack

This guide explains how to deploy the daert stack onto a Kubernetes cluster with Helm.

## Prerequisites

You need a Kubernetes cluster at version 1.29 or newer and Helm 3 on your workstation.

### Storage

A default storage class must exist, so that PostgreSQL can claim its persistent volume.

## Installing

Run helm install with the umbrella chart and wait until every pod reports ready.
"""

TEXT = """\
Release notes for the retrieval service.

Hybrid search now fuses vector and keyword rankings with reciprocal rank fusion.
"""

HTML = """\
<!doctype html>
<html>
<head><title>Rotating API keys | Example Docs</title></head>
<body>
<nav><a href="/">Home</a> <a href="/pricing">Pricing</a> <a href="/blog">Blog navigation</a></nav>
<header><p>Example Docs site banner</p></header>
<main><article>
<h1>Rotating API keys</h1>
<p>API keys should be rotated every ninety days. This page explains how to rotate them
without downtime for the services that use them.</p>
<h2>Creating the new key</h2>
<p>Create a second key in the console first, so that both the old and the new key are
valid while the services switch over to the new one.</p>
<h2>Revoking the old key</h2>
<p>Once no request has used the old key for a day, revoke it in the console; requests that
still carry it are refused from then on.</p>
</article></main>
<footer><p>Copyright 2025 Example Corp. All rights reserved. Privacy policy.</p></footer>
</body>
</html>
"""

PDF_PAGES = [
    "Annual report. Revenue grew by twelve percent, driven by the hosted search product.",
    "Outlook. Next year the company plans to open two new data centres in Europe.",
]

# Enough sentences, each different, to need several chunks of 200 tokens.
LONG_TEXT = "\n\n".join(
    f"Paragraph {i}. The ingestion pipeline reads document number {i}, cuts it into chunks "
    f"that fit the embedding model, and writes chunk {i} with its vector and metadata."
    for i in range(120)
)


def _pdf(path: Path) -> None:
    pdf = FPDF()
    pdf.set_creation_date(PDF_DATE)
    pdf.set_title("Annual report")
    pdf.set_font("Helvetica", size=12)
    for text in PDF_PAGES:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def _docx(path: Path) -> None:
    document = docx.Document()
    document.add_heading("Employee handbook", level=0)  # the Title style
    document.add_paragraph("Welcome to the company. This handbook explains how we work.")
    document.add_heading("Leave", level=1)
    document.add_paragraph("Everyone has twenty-five days of paid leave a year.")
    document.add_heading("Sick leave", level=2)
    document.add_paragraph("Tell your manager on the first day you are ill.")
    document.add_heading("Equipment", level=1)
    table = document.add_table(rows=2, cols=2)
    for row, (item, who) in zip(
        table.rows, [("Laptop", "IT department"), ("Phone", "Office manager")], strict=True
    ):
        row.cells[0].text, row.cells[1].text = item, who
    document.save(str(path))


def write_corpus(root: Path) -> dict[str, Path]:
    """Write the corpus under `root` (created if missing) and return name -> path:

    - "markdown": guide.md, nested headings (H1 > H2 > H3), title "Deploying the stack"
    - "text": notes.txt, plain text
    - "html": web/keys.html, an article between nav, header and footer boilerplate
    - "pdf": reports/annual.pdf, two pages of text (fpdf2), title "Annual report"
    - "docx": reports/hr/handbook.docx, Title "Employee handbook", Heading 1/2, a table
    - "long": big/long.txt, 120 paragraphs: several chunks at 200 tokens
    - "malformed_pdf": broken/bad.pdf, a PDF header and garbage (fails, with a reason)
    - "binary": broken/blob.bin, bytes with NULs (skipped, with a reason)

    Every file but the DOCX has the same bytes on every call (a DOCX zip records the time
    it was written), so re-writing the corpus changes only the DOCX's content hash.
    """
    paths = {
        "markdown": root / "guide.md",
        "text": root / "notes.txt",
        "html": root / "web" / "keys.html",
        "pdf": root / "reports" / "annual.pdf",
        "docx": root / "reports" / "hr" / "handbook.docx",
        "long": root / "big" / "long.txt",
        "malformed_pdf": root / "broken" / "bad.pdf",
        "binary": root / "broken" / "blob.bin",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(MARKDOWN)
    paths["text"].write_text(TEXT)
    paths["html"].write_text(HTML)
    _pdf(paths["pdf"])
    _docx(paths["docx"])
    paths["long"].write_text(LONG_TEXT)
    paths["malformed_pdf"].write_bytes(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n")
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    return paths
