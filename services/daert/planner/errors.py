"""What can go wrong while planning or running a planned task, split by whether retrying can
help: `ServiceUnavailable` (Airflow retries the task with backoff) or any other
`PlannerError` (the task fails at once; its message says why)."""

from __future__ import annotations

from typing import Any

import grpc


class PlannerError(Exception):
    """Retrying will not help: bad params, an invalid plan, a task that failed for good."""


class InvalidPlan(PlannerError):
    """The model wrote no valid plan within the allowed re-plans. `attempts` are every
    attempt's {"attempt", "reply", "errors"}; `errors` the last one's; `usage` the tokens
    planning took."""

    def __init__(self, attempts: list[dict[str, Any]], usage: dict[str, int]) -> None:
        self.attempts = attempts
        self.usage = usage
        self.errors: list[str] = list(attempts[-1]["errors"])
        listed = "\n  ".join(self.errors)
        super().__init__(
            f"no valid plan after {len(attempts)} attempt(s); the last one had:\n  {listed}"
        )


class ServiceUnavailable(PlannerError):
    """A service answered UNAVAILABLE, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED: worth
    retrying later."""


RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def service_error(
    error: grpc.aio.AioRpcError, service: str, target: str, doing: str
) -> PlannerError:
    """The exception for a failed call, naming the service, its target and the call."""
    message = f"{doing}: the {service} service at {target} answered {error.code().name}: "
    message += error.details() or "(no details)"
    if error.code() in RETRYABLE_CODES:
        return ServiceUnavailable(message)
    return PlannerError(message)
