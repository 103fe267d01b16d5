"""The validation helpers: every bad-input check in every servicer goes through `require`,
and every request of every RPC through `reject_nul` (the server interceptor calls it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from daert.runtime.errors import InvalidArgument


def require(condition: bool, field: str, problem: str) -> None:
    """Raise INVALID_ARGUMENT naming `field` unless `condition` holds.

    `field` is the request field path as a client sees it (``inputs``, ``inputs[3]``,
    ``params.top_k``); `problem` says what is wrong in words a caller can act on.
    """
    if not condition:
        raise InvalidArgument(field, problem)


def _entries(field: FieldDescriptor, value: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(path, item) for each value a set field holds: a map's values by key, a repeated
    field's by index, a singular field's value."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(key, str) and "\0" in key:
                yield name, key  # a key is named by its map
            yield f"{name}[{key!r}]", item
    elif field.is_repeated:
        for i, item in enumerate(value):
            yield f"{name}[{i}]", item
    else:
        yield name, value


def _nul_at(message: Message, path: str) -> str | None:
    """The path of the first string in `message` (nested messages, repeated fields and maps
    included) that holds a NUL character, or None."""
    for field, value in message.ListFields():
        for where, item in _entries(field, value, f"{path}.{field.name}" if path else field.name):
            if isinstance(item, Message):
                found = _nul_at(item, where)
                if found:
                    return found
            elif isinstance(item, str) and "\0" in item:
                return where
    return None


def reject_nul(request: Message) -> None:
    """INVALID_ARGUMENT naming the field when any string of `request` holds a NUL character:
    PostgreSQL text, Redis keys, file paths and HTTP headers cannot carry one, so no service
    takes them."""
    field = _nul_at(request, "")
    if field is not None:
        raise InvalidArgument(field, "must not contain NUL (\\x00) characters")
