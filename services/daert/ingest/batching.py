"""Documents into batches of `batch_size`, one Airflow task each, with a label for people
(the DAG's `map_index_template`): "guide.md, api.pdf +14 more"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daert.ingest.sources import SourceDocument

LABEL_NAMES = 2  # file names spelled out in a label
NAME_CHARS = 40  # longer names are cut, so that a label stays one short line


@dataclass(frozen=True)
class Batch:
    label: str
    documents: list[SourceDocument]

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "documents": [d.to_dict() for d in self.documents]}


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def label(documents: Sequence[SourceDocument]) -> str:
    names = ", ".join(_short(d.name) for d in documents[:LABEL_NAMES])
    more = len(documents) - LABEL_NAMES
    return f"{names} +{more} more" if more > 0 else names


def batches(documents: Sequence[SourceDocument], batch_size: int) -> list[Batch]:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return [
        Batch(label(documents[i : i + batch_size]), list(documents[i : i + batch_size]))
        for i in range(0, len(documents), batch_size)
    ]
