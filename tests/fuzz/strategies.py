"""Hypothesis strategies of hostile requests, built from protobuf message descriptors: a new
RPC, message or field is fuzzed without new test code.

`requests(descriptor, overrides)` draws the serialised request (bytes, as it goes on the
wire), because some hostile inputs cannot be built through the protobuf Python API:

- invalid UTF-8 ("lone surrogates"): protobuf refuses a str holding a surrogate at set time,
  so strings hold SURROGATE_MARK instead and the serialised bytes have each mark's UTF-8
  replaced by a lone surrogate's (U+D800 as CESU-8). Both are three bytes, so no length prefix
  changes;
- oneof conflicts: two drawn messages concatenated. A parser merges them, and for a oneof
  keeps the member set last, so this tests that the server takes what the wire says (and
  merging: repeated fields concatenated, singular ones overwritten, sub-messages merged);
- Struct nesting deeper than protobuf can build or parse (it stops at 100 message levels):
  the nested Value/ListValue bytes are encoded here and appended as one more field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

SURROGATE_MARK = "\ue000"
LONE_SURROGATE = b"\xed\xa0\x80"
OVERSIZE = 10_000
# A whole request stays under gRPC's 4 MiB receive limit, so it reaches the service.
HUGE_TEXT = 1_000_000
REQUEST_BYTES = 3_000_000
MESSAGE_DEPTH = 4
# Deep Struct nesting: one list level is two message levels (Value, ListValue).
BUILDABLE_LIST_DEPTH = 45
WIRE_LIST_DEPTH = 150

Overrides = Mapping[str, st.SearchStrategy[Any]]
T = TypeVar("T")

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_INTEGERS = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def mostly(ordinary: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Four draws in five from `ordinary`: a request is rejected at its first hostile field,
    so with every field hostile half the time, examples would rarely get past validation.
    (one_of picks among its branches evenly, so a repeated branch weighs more.)"""
    return st.one_of(ordinary, ordinary, ordinary, ordinary, hostile)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted(e for e in {low, high, 0, 1, -1, 2**31 - 1, 2**32, -(2**31)} if low <= e <= high)
    ordinary = st.integers(max(low, 0), min(high, 64))
    return mostly(ordinary, st.one_of(st.sampled_from(edges), st.integers(low, high)))


def floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), -1.0, 1e30, -1e30]
    hostile = st.one_of(st.sampled_from(edges), st.floats(width=width))  # type: ignore[arg-type]
    return mostly(st.floats(0, 1, width=width), hostile)  # type: ignore[arg-type]


def hostile_text() -> st.SearchStrategy[str]:
    """Strings: empty, blank, NUL and other control characters, a lone surrogate (as a mark,
    see the module's docstring), path and SQL metacharacters, huge, and any other text."""
    edges = [
        "",
        " \t\n",
        "\x00",
        "a\x00b",
        "\x01\x07\x1b[31m\x7f\x85\u2028",
        f"x{SURROGATE_MARK}y",
        "../../../etc/passwd",
        "'; DROP TABLE chunks; --",
        "%s%n{0}${x}",
        "\ufeff\u200b\u202e",
        "x" * HUGE_TEXT,
    ]
    return st.one_of(st.sampled_from(edges), st.text(st.characters(codec="utf-8"), max_size=40))


def text() -> st.SearchStrategy[str]:
    word = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
    words = st.lists(word, min_size=2, max_size=6).map(" ".join)
    return mostly(st.one_of(word, words), hostile_text())


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTEGERS:
        return integers(*_INTEGERS[kind])
    if kind == FieldDescriptor.TYPE_FLOAT:
        return floats(32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return floats(64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return mostly(st.binary(max_size=64), st.just(b"\0" * HUGE_TEXT))
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values if value.number]
        return mostly(st.sampled_from(known), integers(*INT32))
    raise NotImplementedError(f"{field.full_name}: field type {kind} has no strategy")


def _nested_list(depth: int) -> list[Any]:
    value: list[Any] = ["leaf"]
    for _ in range(depth - 1):
        value = [value]
    return value


def _json() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), floats(64), text())
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(text(), children, max_size=4)
        ),
        max_leaves=12,
    )


def _struct() -> st.SearchStrategy[Message]:
    """Struct: any JSON object, one nested as deep as protobuf builds, one huge list."""
    objects = st.one_of(
        st.dictionaries(text(), _json(), max_size=5),
        st.just({"deep": _nested_list(BUILDABLE_LIST_DEPTH)}),
        st.just({"huge": [0.0] * OVERSIZE}),
    )

    def build(value: dict[str, Any]) -> Message:
        struct = struct_pb2.Struct()
        struct.update(value)
        return struct

    return objects.map(build)


def _cap(items: list[Any]) -> list[Any]:
    """An oversize repeated field: OVERSIZE copies, fewer where that would pass
    REQUEST_BYTES."""
    item = items[0]
    size = item.ByteSize() if isinstance(item, Message) else len(str(item).encode())
    return items * max(1, min(OVERSIZE, REQUEST_BYTES // max(size, 1)))


class _Builder:
    def __init__(self, overrides: Overrides) -> None:
        self._overrides = overrides

    def value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
        if field.message_type is None and field.name in self._overrides:
            single = self._overrides[field.name]
        elif field.message_type is None:
            single = _scalar(field)
        elif field.message_type.full_name == "google.protobuf.Struct":
            single = _struct()
        elif depth >= MESSAGE_DEPTH:
            return None
        else:
            single = self.message(field.message_type, depth + 1)
        if not field.is_repeated:
            return single
        return mostly(
            st.lists(single, min_size=1, max_size=3),
            st.one_of(st.just([]), single.map(lambda x: _cap([x]))),
        )

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        optional: dict[str, st.SearchStrategy[Any]] = {}
        choices: list[st.SearchStrategy[dict[str, Any]]] = []
        for oneof in descriptor.oneofs:
            if _synthetic(oneof.fields):
                continue
            members = [
                (field.name, strategy)
                for field in oneof.fields
                if (strategy := self.value(field, depth)) is not None
            ]
            choices.append(
                st.one_of(st.just({}), *(st.fixed_dictionaries({n: s}) for n, s in members))
            )
        required: dict[str, st.SearchStrategy[Any]] = {}
        for field in descriptor.fields:
            if field.containing_oneof is None or _synthetic(field.containing_oneof.fields):
                strategy = self.value(field, depth)
                # An overridden field is always set: it is what gets a request past NOT_FOUND.
                chosen = required if field.name in self._overrides else optional
                if strategy is not None:
                    chosen[field.name] = strategy
        parts = st.tuples(st.fixed_dictionaries(required, optional=optional), *choices)
        return parts.map(lambda dicts: _fill(cls(), {k: v for d in dicts for k, v in d.items()}))


def _synthetic(fields: Sequence[FieldDescriptor]) -> bool:
    """A proto3 `optional` field's one-member oneof, which is no choice at all."""
    return len(fields) == 1 and fields[0].containing_oneof.name == f"_{fields[0].name}"


def _fill(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            getattr(message, name).extend(value)  # copies messages too
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


# --- wire-level hostility --------------------------------------------------------------------


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_struct_bytes(depth: int) -> bytes:
    """A Struct {"deep": [[[... "leaf" ...]]]} nested `depth` lists deep, encoded by hand
    (Struct.fields = 1, its entry's key = 1 and value = 2, Value.list_value = 6,
    Value.string_value = 3, ListValue.values = 1)."""
    value = _length_delimited(3, b"leaf")
    for _ in range(depth):
        value = _length_delimited(6, _length_delimited(1, value))
    entry = _length_delimited(1, b"deep") + _length_delimited(2, value)
    return _length_delimited(1, entry)


def struct_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """The field paths from `descriptor` to each Struct it holds (sub-messages included)."""
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        if field.message_type.full_name == "google.protobuf.Struct":
            yield (field,)
        elif depth < MESSAGE_DEPTH and not field.message_type.full_name.startswith("google."):
            for rest in struct_paths(field.message_type, depth + 1):
                yield (field, *rest)


def at_path(path: tuple[FieldDescriptor, ...], payload: bytes) -> bytes:
    """`payload` as the value of the field at `path`: appended to a message, the parser
    merges it in (a new element where a field on the path is repeated)."""
    for field in reversed(path):
        payload = _length_delimited(field.number, payload)
    return payload


def _patch_surrogates(wire: bytes) -> bytes:
    return wire.replace(SURROGATE_MARK.encode(), LONE_SURROGATE)


def requests(descriptor: Descriptor, overrides: Overrides) -> st.SearchStrategy[bytes]:
    """Serialised requests of type `descriptor`; `overrides` replaces the strategy of each
    scalar field so named (known model names, fixed programs) wherever it occurs."""
    messages = _Builder(overrides).message(descriptor)
    wire = messages.map(lambda m: m.SerializeToString())
    kinds: list[st.SearchStrategy[bytes]] = [st.tuples(wire, wire).map(b"".join)]
    paths = list(struct_paths(descriptor))
    if paths:
        deep = st.sampled_from(paths).map(lambda p: at_path(p, deep_struct_bytes(WIRE_LIST_DEPTH)))
        kinds.append(st.tuples(wire, deep).map(b"".join))
    return mostly(wire, st.one_of(kinds)).map(_patch_surrogates)


def known(values: Sequence[str]) -> st.SearchStrategy[str]:
    """A field that names something that must exist: often one that does, so that fuzzing
    reaches past NOT_FOUND, otherwise any hostile string."""
    return mostly(st.sampled_from(values), hostile_text()) if values else text()
