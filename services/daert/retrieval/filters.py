"""The metadata filter language (documented in retrieval.proto), parsed into a small tree.

Backends compile the tree, never the raw JSON: pgvector into parameterised SQL, Weaviate
into its filter objects. Parsing checks everything a backend relies on, and a malformed
filter is INVALID_ARGUMENT naming the path of the offending part ("filter.and[1].year.range").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from daert.runtime.errors import InvalidArgument
from daert.runtime.validation import require

Scalar = str | float | bool
Path = tuple[str, ...]  # a dotted key split on dots: "author.name" -> ("author", "name")

MAX_DEPTH = 16
MAX_NODES = 256
MAX_KEY_CHARS = 256
MAX_IN_VALUES = 1024
RANGE_OPS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class Equals:
    """eq / in: the key equals one of `values` (any element, for a list-valued key)."""

    path: Path
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Range:
    path: Path
    bounds: tuple[tuple[Literal["gt", "gte", "lt", "lte"], float | str], ...]


@dataclass(frozen=True)
class Exists:
    path: Path


@dataclass(frozen=True)
class And:
    children: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    child: Filter


Filter = Equals | Range | Exists | And | Or | Not


def parse_filter(raw: dict[str, Any], field: str = "filter") -> Filter | None:
    """The filter tree for a JSON filter; None for an empty filter (matches everything)."""
    if not raw:
        return None
    parser = _Parser()
    return parser.object(raw, field, depth=0)


class _Parser:
    def __init__(self) -> None:
        self.nodes = 0

    def _count(self, where: str) -> None:
        self.nodes += 1
        require(self.nodes <= MAX_NODES, where, f"filter has more than {MAX_NODES} conditions")

    def object(self, raw: Any, where: str, depth: int) -> Filter:
        require(depth <= MAX_DEPTH, where, f"filter nests deeper than {MAX_DEPTH} levels")
        require(isinstance(raw, dict), where, "must be an object")
        require(bool(raw), where, "must not be empty")
        parts = [self.entry(key, value, where, depth) for key, value in raw.items()]
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def entry(self, key: str, value: Any, where: str, depth: int) -> Filter:
        if key in ("and", "or"):
            here = f"{where}.{key}"
            require(isinstance(value, list) and bool(value), here, "must be a non-empty list")
            children = tuple(
                self.object(item, f"{here}[{i}]", depth + 1) for i, item in enumerate(value)
            )
            return And(children) if key == "and" else Or(children)
        if key == "not":
            return Not(self.object(value, f"{where}.not", depth + 1))
        path = _path(key, where)
        here = f"{where}.{key}"
        if not isinstance(value, dict):
            return self.equals(path, [value], here)
        require(bool(value), here, "must name an operator: eq, ne, in, range or exists")
        conditions = [self.operator(path, op, arg, f"{here}.{op}") for op, arg in value.items()]
        return conditions[0] if len(conditions) == 1 else And(tuple(conditions))

    def operator(self, path: Path, op: str, arg: Any, where: str) -> Filter:
        if op == "eq":
            return self.equals(path, [arg], where)
        if op == "ne":
            return Not(self.equals(path, [arg], where))
        if op == "in":
            require(isinstance(arg, list) and bool(arg), where, "must be a non-empty list")
            require(len(arg) <= MAX_IN_VALUES, where, f"at most {MAX_IN_VALUES} values")
            return self.equals(path, arg, where)
        if op == "range":
            return self.range(path, arg, where)
        if op == "exists":
            self._count(where)
            require(isinstance(arg, bool), where, "must be true or false")
            return Exists(path) if arg else Not(Exists(path))
        raise InvalidArgument(where, f"unknown operator {op!r}; use eq, ne, in, range or exists")

    def equals(self, path: Path, values: list[Any], where: str) -> Equals:
        self._count(where)
        for i, value in enumerate(values):
            here = where if len(values) == 1 else f"{where}[{i}]"
            require(
                isinstance(value, str | bool | int | float),
                here,
                "must be a string, number or boolean (use exists to test for a missing key)",
            )
        return Equals(path, tuple(values))

    def range(self, path: Path, arg: Any, where: str) -> Range:
        self._count(where)
        require(isinstance(arg, dict) and bool(arg), where, "must be an object of gt/gte/lt/lte")
        bounds: list[tuple[Any, float | str]] = []
        for op, bound in arg.items():
            require(op in RANGE_OPS, f"{where}.{op}", "unknown bound; use gt, gte, lt or lte")
            require(
                isinstance(bound, str | int | float) and not isinstance(bound, bool),
                f"{where}.{op}",
                "must be a number or a string",
            )
            bounds.append((op, bound))
        kinds = {isinstance(bound, str) for _, bound in bounds}
        require(len(kinds) == 1, where, "bounds must be all numbers or all strings")
        return Range(path, tuple(bounds))


def _path(key: str, where: str) -> Path:
    require(0 < len(key) <= MAX_KEY_CHARS, where, f"keys must have 1 to {MAX_KEY_CHARS} characters")
    parts = tuple(key.split("."))
    require(all(parts), f"{where}.{key}", "a dotted key must not have empty parts")
    return parts
