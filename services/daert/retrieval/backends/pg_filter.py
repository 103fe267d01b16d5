"""Filter trees compiled to parameterised PostgreSQL over the JSONB `metadata` column.

Keys and values only ever travel as bind parameters (JSON documents, text[] paths); the SQL
text is assembled from fixed fragments, so nothing a caller writes can change a statement.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from daert.retrieval.filters import And, Equals, Exists, Filter, Not, Or, Path, Range

# Range bounds as jsonpath comparisons against named variables. jsonpath compares numbers
# with numbers and strings with strings; a value of another type is "unknown", which
# jsonb_path_match(..., silent => true) reads as no match instead of a cast error.
_RANGE_JSONPATH = {"gt": "$ > $gt", "gte": "$ >= $gte", "lt": "$ < $lt", "lte": "$ <= $lte"}


def compile_filter(where: Filter) -> tuple[sql.Composable, list[Any]]:
    """A boolean SQL expression and its parameters, in placeholder order."""
    params: list[Any] = []
    return _compile(where, params), params


def _compile(node: Filter, params: list[Any]) -> sql.Composable:
    if isinstance(node, Equals):
        # Containment matches a scalar equal to the value and a list holding it, and is
        # answered by the GIN (jsonb_path_ops) index on metadata.
        alternatives = []
        for value in node.values:
            params.extend([Jsonb(_nested(node.path, value)), Jsonb(_nested(node.path, [value]))])
            alternatives.append(sql.SQL("metadata @> %s OR metadata @> %s"))
        return sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives))
    if isinstance(node, Range):
        expression = " && ".join(_RANGE_JSONPATH[op] for op, _ in node.bounds)
        params.extend([list(node.path), expression, Jsonb(dict(node.bounds))])
        return sql.SQL("coalesce(jsonb_path_match(metadata #> %s, %s::jsonpath, %s, true), false)")
    if isinstance(node, Exists):
        params.append(list(node.path))
        return sql.SQL("(metadata #> %s IS NOT NULL)")
    if isinstance(node, Not):
        return sql.SQL("(NOT {})").format(_compile(node.child, params))
    joiner = sql.SQL(" AND ") if isinstance(node, And) else sql.SQL(" OR ")
    assert isinstance(node, And | Or)
    return sql.SQL("({})").format(joiner.join(_compile(child, params) for child in node.children))


def _nested(path: Path, value: Any) -> Any:
    for key in reversed(path):
        value = {key: value}
    return value
