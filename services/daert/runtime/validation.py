"""The validation helpers: every bad-input check in every servicer goes through `require`,
and every request of every RPC through `check_request` (the server interceptor calls it,
on what `decoder` made of the request's bytes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

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


@dataclass(frozen=True)
class Undecodable:
    """What `decoder` hands on for request bytes that do not parse: `field` is where."""

    field: str


_UNDECODABLE = "is not valid protobuf: a string that is not UTF-8, or nesting too deep"


def decoder(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A handler's request deserializer (a generated ``Request.FromString``), except that
    bytes it cannot parse become an `Undecodable`: grpc would answer UNKNOWN for them, and
    they are the client's mistake (invalid UTF-8 in a string, or nesting past protobuf's
    recursion limit, e.g. a deep google.protobuf.Struct)."""
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    if not isinstance(descriptor, Descriptor):
        return decode

    def decode_or_locate(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return Undecodable(_undecodable_at(descriptor, data, "") or "request")

    return decode_or_locate


def _length_delimited(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of each length-delimited field of a serialised message; stops
    at the first malformed tag."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while pos < len(data):
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise DecodeError("truncated varint")

    try:
        while pos < len(data):
            key = varint()
            kind = key & 7
            if kind == 0:
                varint()
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            elif kind == 2:
                size = varint()
                yield key >> 3, data[pos : pos + size]
                pos += size
            else:
                return  # groups: no daert message has one
    except DecodeError:
        return


def _undecodable_at(descriptor: Descriptor, data: bytes, path: str) -> str | None:
    """The path of the field whose bytes do not parse, named as deep as daert's own messages
    go (a well-known type such as Struct is named as a whole)."""
    seen: dict[int, int] = {}
    for number, payload in _length_delimited(data):
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        index = seen[number] = seen.get(number, -1) + 1
        name = f"{path}.{field.name}" if path else field.name
        where = f"{name}[{index}]" if field.is_repeated else name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return where
        elif field.message_type is not None:
            try:
                message_factory.GetMessageClass(field.message_type).FromString(payload)
            except DecodeError:
                if field.message_type.full_name.startswith("google.protobuf."):
                    return where
                return _undecodable_at(field.message_type, payload, where) or where
    return None


def check_request(request: Message | Undecodable) -> None:
    """INVALID_ARGUMENT naming the field for a request that did not parse, or that holds a
    NUL character (`reject_nul`)."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.field, _UNDECODABLE)
    reject_nul(request)
