"""The one validation helper: every bad-input check in every servicer goes through `require`."""

from __future__ import annotations

from daert.runtime.errors import InvalidArgument


def require(condition: bool, field: str, problem: str) -> None:
    """Raise INVALID_ARGUMENT naming `field` unless `condition` holds.

    `field` is the request field path as a client sees it (``inputs``, ``inputs[3]``,
    ``params.top_k``); `problem` says what is wrong in words a caller can act on.
    """
    if not condition:
        raise InvalidArgument(field, problem)
