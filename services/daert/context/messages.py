"""The conversation as the context service reasons about it: plain messages (role names as
chat templates spell them) and the units that are kept or condensed whole."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from daert.runtime.validation import require
from daert.v1 import common_pb2

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
ROLE_VALUES = {name: value for value, name in ROLE_NAMES.items()}


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant, tool
    content: str
    name: str = ""

    def template_dict(self) -> dict[str, str]:
        """The message as chat templates (Hugging Face, llama.cpp) take it."""
        entry = {"role": self.role, "content": self.content}
        if self.name:
            entry["name"] = self.name
        return entry

    def to_proto(self) -> common_pb2.ChatMessage:
        return common_pb2.ChatMessage(
            role=ROLE_VALUES[self.role], content=self.content, name=self.name
        )


def parse_messages(
    messages: Sequence[common_pb2.ChatMessage], max_messages: int, max_chars: int
) -> list[Message]:
    """Validated messages: INVALID_ARGUMENT naming the field."""
    require(len(messages) > 0, "messages", "at least one message is required")
    require(
        len(messages) <= max_messages,
        "messages",
        f"{len(messages)} messages; at most {max_messages} per request",
    )
    parsed = []
    total = 0
    for i, message in enumerate(messages):
        require(
            message.role in ROLE_NAMES,
            f"messages[{i}].role",
            "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL",
        )
        total += len(message.content)
        parsed.append(Message(ROLE_NAMES[message.role], message.content, message.name))
    require(total <= max_chars, "messages", f"{total} characters; at most {max_chars} per request")
    return parsed


def units(messages: Sequence[Message]) -> list[list[int]]:
    """Indexes of `messages` grouped into what is kept or condensed whole: an assistant turn
    together with the tool results that answer it; every other message on its own."""
    grouped: list[list[int]] = []
    for i, message in enumerate(messages):
        if message.role == "tool" and grouped and messages[grouped[-1][0]].role == "assistant":
            grouped[-1].append(i)
        else:
            grouped.append([i])
    return grouped


def fingerprint(messages: Sequence[Message]) -> str:
    """Identifies exactly these messages in this order (roles, names and texts)."""
    digest = hashlib.sha256()
    for message in messages:
        digest.update(json.dumps(message.template_dict(), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()
