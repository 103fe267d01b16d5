"""What every tokenizer gives the context service: exact counts of a conversation as the
model reads it (through its chat template, with the generation prompt), each message's share
of them, and text cut to a number of tokens.

A backend only renders messages with the model's chat template and tokenizes text with
offsets; `TemplatedTokenizer` does the rest, the same way for every backend: it renders the
whole conversation once, tokenizes it once, and gives each token to the message whose span
of the rendered text it starts in. A message's span runs from the end of the previous
message's text to the end of its own, so it carries its role formatting; what follows the
last message (its end-of-turn and the generation prompt) is the conversation's overhead.
Totals are exact by construction; shares add up to them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from daert.context.messages import Message


@dataclass(frozen=True)
class Counted:
    total: int
    per_message: list[int]

    @property
    def overhead(self) -> int:
        return self.total - sum(self.per_message)


@dataclass(frozen=True)
class Tokens:
    """Token ids of a text and where each starts in it (character offsets)."""

    ids: list[int]
    starts: list[int]


def shares(rendered: str, starts: Sequence[int], parts: Sequence[str]) -> list[int]:
    """Tokens per part of `rendered` (message texts, in order): a token counts for the part
    whose span its start lies in."""
    ends = []
    cursor = 0
    for part in parts:
        # Templates often trim contents; an unfound text keeps the cursor, so its tokens go
        # to the next part and the total stays exact.
        text = part.strip()
        found = rendered.find(text, cursor) if text else -1
        if found >= 0:
            cursor = found + len(text)
        ends.append(cursor)
    counts = [0] * len(parts)
    index = 0
    for start in starts:
        while index < len(ends) and start >= ends[index]:
            index += 1
        if index < len(ends):
            counts[index] += 1
    return counts


class TemplatedTokenizer(abc.ABC):
    """A model's tokenizer and chat template; backends implement the four primitives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False
        self.unavailable_reason = "not started"

    @abc.abstractmethod
    async def render(self, messages: Sequence[Message]) -> str:
        """The conversation through the model's chat template, with the generation prompt."""

    @abc.abstractmethod
    async def tokenize(self, text: str, *, prompt: bool = False) -> Tokens:
        """Tokens of `text` (special tokens in it parsed); `prompt`: a rendered conversation,
        tokenized exactly as the model's server reads a prompt (BOS and all)."""

    @abc.abstractmethod
    async def detokenize(self, ids: Sequence[int]) -> str: ...

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Load what the backend needs; a failure here is reported by `check_ready`."""

    @abc.abstractmethod
    async def check_ready(self) -> bool: ...

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    async def count(self, messages: Sequence[Message]) -> Counted:
        rendered = await self.render(messages)
        tokens = await self.tokenize(rendered, prompt=True)
        contents = [m.content for m in messages]
        return Counted(len(tokens.ids), shares(rendered, tokens.starts, contents))

    async def count_parts(self, parts: Sequence[str]) -> list[int]:
        """Tokens of each text, from one tokenization of them joined by newlines."""
        joined = "\n".join(parts)
        return shares(joined, (await self.tokenize(joined)).starts, parts)

    async def count_text(self, text: str) -> int:
        return len((await self.tokenize(text)).ids) if text else 0

    async def truncate(self, text: str, max_tokens: int) -> str:
        """The longest start of `text` within `max_tokens` tokens (whole tokens)."""
        if max_tokens <= 0:
            return ""
        tokens = await self.tokenize(text)
        if len(tokens.ids) <= max_tokens:
            return text
        return await self.detokenize(tokens.ids[:max_tokens])
