"""What a summarizer does: fold new turns into the summary so far, within a token limit.

Every summary is a fold (earlier summary + new turns -> new summary), so a long history is
condensed chunk by chunk and a rolling conversation only pays for the turns that are new
since its stored summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from daert.context.messages import Message
from daert.context.tokenizers import TemplatedTokenizer
from daert.v1 import context_pb2


@dataclass(frozen=True)
class Summary:
    text: str
    prompt_tokens: int = 0  # spent by the generation service, when one wrote it
    completion_tokens: int = 0


@dataclass(frozen=True)
class Condensing:
    """What a summary is written for: the model that will read it (its tokenizer), the
    tenant, and the generation model that writes it (abstractive)."""

    tokenizer: TemplatedTokenizer
    tenant: str
    summary_model: str


def transcript(turns: Sequence[Message]) -> list[str]:
    """One line per turn, as summaries quote them ("user: ...", "tool lookup: ...")."""
    return [
        f"{m.role}{' ' + m.name if m.name else ''}: {' '.join(m.content.split())}" for m in turns
    ]


class Summarizer(Protocol):
    strategy: context_pb2.CompressionStrategy.ValueType

    async def fold(
        self, previous: str, turns: Sequence[Message], max_tokens: int, job: Condensing
    ) -> Summary:
        """A summary of `previous` (may be empty) followed by `turns`, of at most about
        `max_tokens` tokens (the caller cuts it exactly)."""
        ...

    async def close(self) -> None: ...
