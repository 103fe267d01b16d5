"""What the RPC being served carries on to every call it makes: its request id and deadline.

The server interceptor sets both for the duration of an RPC (each RPC runs in its own task,
so the values are private to it); clients and HTTP backends read them, so a request id
follows a request across services and a caller's deadline bounds every hop below it.
"""

from __future__ import annotations

import contextvars
import time
import uuid

REQUEST_ID_HEADER = "x-request-id"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "daert_request_id", default=None
)
# time.monotonic() value at which the inbound RPC's deadline passes; None when it has none.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "daert_deadline", default=None
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return request_id_var.get()


def remaining_s(timeout_s: float) -> float:
    """`timeout_s`, shortened to what is left of the inbound RPC's deadline."""
    deadline = deadline_var.get()
    if deadline is None:
        return timeout_s
    return max(0.0, min(timeout_s, deadline - time.monotonic()))
