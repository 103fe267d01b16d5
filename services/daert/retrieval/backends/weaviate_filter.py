"""Chunk metadata as filterable Weaviate properties, and filter trees compiled against them.

Weaviate filters match properties of a fixed type, while our metadata is free JSON. Every
scalar found at a dotted path is therefore stored, per JSON type, in an array property named
after the path and the type:

    ms_<path>  text[]     strings    (field tokenization, compared byte-wise)
    mn_<path>  number[]   numbers
    mb_<path>  boolean[]  booleans
    meta_keys  text[]     every dotted path present, whatever its value (null included)

A scalar is stored as a one-element array and a list as its scalar elements, so that `eq` and
`in` (contains-any) match a list when any element matches, and a key holding a string in one
chunk and a number in another fills two properties instead of conflicting. Nested objects
flatten to dotted paths; elements of a list that are objects or lists are kept in the stored
metadata but are not filterable, and keys that are empty or contain a dot cannot be addressed
by a dotted filter key, so they are not flattened either. These are exactly the paths the
pgvector backend can reach, so both answer every filter alike.

Path encoding: characters other than [a-z0-9] become "_" and two lower-case hex digits per
UTF-8 byte ("author.name" -> "ms_author_2ename"), which is injective and all lower case
(Weaviate compares property names case-insensitively). A name longer than Weaviate's limit
uses the SHA-256 of the path instead, under the prefixes hs_/hn_/hb_.

String values: Weaviate's field tokenization trims surrounding whitespace, so strings are
stored and compared wrapped in U+0001 on both sides. Every value shares the prefix, and the
suffix sorts below any other character, so equality is exact and byte-wise order is kept
(strings that themselves contain U+0000 or U+0001 may order differently).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any, Literal

from weaviate.collections.classes.filters import Filter as WeaviateFilter
from weaviate.collections.classes.filters import _Filters

from daert.retrieval.filters import And, Equals, Exists, Filter, Not, Or, Path, Range, Scalar

Kind = Literal["s", "n", "b"]  # string, number, boolean
KEYS_PROPERTY = "meta_keys"
MAX_PROPERTY_NAME = 230  # Weaviate rejects longer property names
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_MARK = "\x01"

# A compiled filter: a Weaviate filter, or True / False when it matches every chunk / none
# (a condition on a key that no chunk ever had needs no query at all).
Compiled = _Filters | bool


def kind_of(value: Any) -> Kind | None:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        return "n"
    if isinstance(value, str):
        return "s"
    return None


def property_name(kind: Kind, path: Path) -> str:
    dotted = ".".join(path)
    encoded = "".join(
        char if char in _PLAIN else "".join(f"_{byte:02x}" for byte in char.encode())
        for char in dotted
    )
    name = f"m{kind}_{encoded}"
    if len(name) <= MAX_PROPERTY_NAME:
        return name
    return f"h{kind}_{hashlib.sha256(dotted.encode()).hexdigest()}"


def encode_string(value: str) -> str:
    return f"{_MARK}{value}{_MARK}"


def _stored(kind: Kind, value: Scalar) -> Any:
    if kind == "s":
        assert isinstance(value, str)
        return encode_string(value)
    if kind == "n":
        return float(value)
    return value


def flatten(metadata: dict[str, Any]) -> dict[str, list[Any]]:
    """The filterable properties of a chunk's metadata: {property name: values}."""
    properties: dict[str, list[Any]] = {}
    keys: list[str] = []

    def add(path: Path, value: Any) -> None:
        kind = kind_of(value)
        if kind is not None:
            properties.setdefault(property_name(kind, path), []).append(_stored(kind, value))

    def walk(node: dict[str, Any], prefix: Path) -> None:
        for key, value in node.items():
            if not key or "." in key:
                continue  # no dotted filter key can address it
            path = (*prefix, key)
            keys.append(encode_string(".".join(path)))
            if isinstance(value, dict):
                walk(value, path)
            elif isinstance(value, list):
                for item in value:
                    add(path, item)
            else:
                add(path, value)

    walk(metadata, ())
    properties[KEYS_PROPERTY] = keys
    return properties


def property_kind(name: str) -> Kind | None:
    """The value type of a flattened metadata property, None for other properties."""
    if len(name) > 3 and name[0] in "mh" and name[2] == "_":
        return _KINDS.get(name[1])
    return None


_KINDS: dict[str, Kind] = {"s": "s", "n": "n", "b": "b"}


def compile_filter(where: Filter, known: Collection[str]) -> tuple[Compiled, set[str]]:
    """The Weaviate filter for a filter tree, given the metadata properties that exist, and
    the properties it referred to that do not (a caller may refresh its view and retry)."""
    missing: set[str] = set()

    def prop(kind: Kind, path: Path) -> str | None:
        name = property_name(kind, path)
        if name in known:
            return name
        missing.add(name)
        return None

    def build(node: Filter) -> Compiled:
        if isinstance(node, Equals):
            by_kind: dict[Kind, list[Any]] = {}
            for value in node.values:
                kind = kind_of(value)
                assert kind is not None
                by_kind.setdefault(kind, []).append(_stored(kind, value))
            parts: list[Compiled] = []
            for kind, values in by_kind.items():
                name = prop(kind, node.path)
                if name is not None:
                    parts.append(WeaviateFilter.by_property(name).contains_any(values))
            return _any(parts)
        if isinstance(node, Range):
            kind = "s" if isinstance(node.bounds[0][1], str) else "n"
            name = prop(kind, node.path)
            if name is None:
                return False
            field = WeaviateFilter.by_property(name)
            comparisons: dict[str, Callable[[Any], _Filters]] = {
                "gt": field.greater_than,
                "gte": field.greater_or_equal,
                "lt": field.less_than,
                "lte": field.less_or_equal,
            }
            return _all([comparisons[op](_stored(kind, bound)) for op, bound in node.bounds])
        if isinstance(node, Exists):
            dotted = encode_string(".".join(node.path))
            return WeaviateFilter.by_property(KEYS_PROPERTY).contains_any([dotted])
        if isinstance(node, Not):
            child = build(node.child)
            return (not child) if isinstance(child, bool) else WeaviateFilter.not_(child)
        if isinstance(node, And):
            return _all([build(child) for child in node.children])
        assert isinstance(node, Or)
        return _any([build(child) for child in node.children])

    return build(where), missing


def _all(parts: list[Compiled]) -> Compiled:
    if any(part is False for part in parts):
        return False
    filters = [part for part in parts if not isinstance(part, bool)]
    if not filters:
        return True
    return filters[0] if len(filters) == 1 else WeaviateFilter.all_of(filters)


def _any(parts: list[Compiled]) -> Compiled:
    if any(part is True for part in parts):
        return True
    filters = [part for part in parts if not isinstance(part, bool)]
    if not filters:
        return False
    return filters[0] if len(filters) == 1 else WeaviateFilter.any_of(filters)
