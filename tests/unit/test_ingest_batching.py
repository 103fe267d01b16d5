"""Batches of documents and their labels (the DAG's map_index_template)."""

from __future__ import annotations

import pytest
from daert.ingest.batching import batches, label
from daert.ingest.sources import SourceDocument


def _docs(*names: str) -> list[SourceDocument]:
    return [SourceDocument.from_uri(f"file:///data/{n}", "file:///data") for n in names]


def test_batches_keep_order_and_size() -> None:
    documents = _docs(*(f"f{i}.md" for i in range(7)))
    made = batches(documents, 3)
    assert [len(b.documents) for b in made] == [3, 3, 1]
    assert [d for b in made for d in b.documents] == documents
    assert batches([], 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        batches(documents, 0)


def test_labels_name_the_files() -> None:
    assert label(_docs("guide.md")) == "guide.md"
    assert label(_docs("guide.md", "api.pdf")) == "guide.md, api.pdf"
    many = _docs("guide.md", "api.pdf", *(f"x{i}" for i in range(14)))
    assert label(many) == "guide.md, api.pdf +14 more"
    long_name = "a" * 100 + ".md"
    assert label(_docs(long_name)) == "a" * 39 + "…"


def test_batch_dict_round_trip() -> None:
    [batch] = batches(_docs("guide.md"), 16)
    assert batch.to_dict() == {
        "label": "guide.md",
        "documents": [
            {
                "uri": "file:///data/guide.md",
                "document_id": batch.documents[0].document_id,
                "name": "guide.md",
                "source": "file:///data",
            }
        ],
    }
