"""Chunking with the real all-MiniLM-L6-v2 tokenizer: limits, overlap, ids, sections."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from daert.embedding.config import default_model_path
from daert.ingest.chunking import Chunker, load_tokenizer, tokenizer_file
from daert.ingest.errors import IngestError
from daert.ingest.readers import ParsedDocument, Section, read
from tokenizers import Tokenizer

from tests.ingest_corpus import LONG_TEXT, MARKDOWN

MINILM_LIMIT = 256  # ListModels' max_input_tokens for all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(tokenizer_file("all-MiniLM-L6-v2", {}))


def _with_specials(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=True).ids)


def _long() -> ParsedDocument:
    return ParsedDocument("long", [Section(LONG_TEXT)])


def test_no_chunk_exceeds_the_model_limit_with_special_tokens(tokenizer: Tokenizer) -> None:
    # Asking for more than the model reads: the capacity drops to the limit less [CLS], [SEP].
    chunker = Chunker(tokenizer, MINILM_LIMIT, chunk_tokens=1000, overlap_tokens=0)
    assert chunker.capacity == MINILM_LIMIT - 2
    chunks = chunker.chunks("doc-1", _long())
    counts = [_with_specials(tokenizer, c.text) for c in chunks]
    assert len(chunks) > 3
    assert max(counts) <= MINILM_LIMIT
    assert max(counts) > MINILM_LIMIT - 20  # chunks are filled up, so the bound is tight
    assert counts == [chunker.token_count(c.text) for c in chunks]


def test_chunk_tokens_below_the_limit_is_the_capacity(tokenizer: Tokenizer) -> None:
    chunker = Chunker(tokenizer, MINILM_LIMIT, chunk_tokens=64, overlap_tokens=8)
    chunks = chunker.chunks("doc-1", _long())
    assert max(len(tokenizer.encode(c.text, add_special_tokens=False).ids) for c in chunks) <= 64
    assert len(chunks) > 20


def test_overlap_repeats_the_end_of_a_chunk(tokenizer: Tokenizer) -> None:
    def shared(overlap: int) -> list[bool]:
        chunks = Chunker(tokenizer, MINILM_LIMIT, 100, overlap).chunks("d", _long())
        # The next chunk begins with words the previous one ends with.
        return [b.text[:30] in a.text for a, b in itertools.pairwise(chunks)]

    assert all(shared(40))
    assert not any(shared(0))


def test_ids_and_positions_are_stable(tokenizer: Tokenizer) -> None:
    chunker = Chunker(tokenizer, MINILM_LIMIT, 100, 10)
    first, again = chunker.chunks("doc-abc", _long()), chunker.chunks("doc-abc", _long())
    assert first == again
    assert [c.position for c in first] == list(range(len(first)))
    assert [c.id for c in first] == [f"doc-abc#{i}" for i in range(len(first))]


def test_chunks_never_span_sections(tokenizer: Tokenizer) -> None:
    parsed = read(MARKDOWN.encode(), "guide.md")
    # Tiny chunks: several per section, so a chunk could span two if the splitter saw both.
    chunks = Chunker(tokenizer, MINILM_LIMIT, 12, 2).chunks("d", parsed)
    sections = {s.headings: s.text for s in parsed.sections}
    assert len(chunks) > len(sections)
    for chunk in chunks:
        assert chunk.text in sections[chunk.headings]
    assert {c.headings for c in chunks} == set(sections)


def test_pdf_pages_carry_over_to_chunks(tokenizer: Tokenizer) -> None:
    parsed = ParsedDocument("p", [Section("first page", page=1), Section("second page", page=2)])
    chunks = Chunker(tokenizer, MINILM_LIMIT, 200, 32).chunks("d", parsed)
    assert [(c.text, c.page) for c in chunks] == [("first page", 1), ("second page", 2)]


def test_tokenizer_from_configuration(tmp_path: Path) -> None:
    folder = Path(default_model_path())
    assert tokenizer_file("mine", {"mine": str(folder)}) == folder / "tokenizer.json"
    single = folder / "tokenizer.json"
    assert tokenizer_file("mine", {"mine": str(single)}) == single
    with pytest.raises(IngestError, match="DAERT_INGEST_TOKENIZERS"):
        tokenizer_file("other-model", {})
    with pytest.raises(IngestError, match="does not exist"):
        load_tokenizer(tmp_path / "tokenizer.json")
