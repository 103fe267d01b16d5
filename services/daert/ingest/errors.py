"""What can go wrong during ingestion, split by who must act.

A `DocumentProblem` concerns one document (unreachable, unreadable, too long): it is written
into the batch report and the other documents carry on. `ServiceUnavailable` means a daert
service the run needs is down or overloaded: the task fails, and Airflow retries it with
backoff; writes are per document and idempotent, so a retried batch converges. Anything
else is an `IngestError` that retrying will not fix (bad params, a misconfigured model).
"""

from __future__ import annotations

import grpc


class IngestError(Exception):
    """Ingestion cannot go on; the message says why and what to change."""


class InvalidParams(IngestError, ValueError):
    """The run's params are invalid; the message names each offending field."""


class EmptySource(IngestError):
    """A source entry matched no document (a mistyped path must never look like an empty
    folder, or "sync" mode would delete everything)."""


class ServiceUnavailable(IngestError):
    """A daert service answered UNAVAILABLE, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, or
    could not be reached: worth retrying later."""


class DocumentProblem(Exception):
    """One document could not be ingested; `reason` says why, for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DocumentFailed(DocumentProblem):
    """The document should have been ingested but could not: fetch failed, malformed file,
    a chunk the embedding service refused."""


class DocumentSkipped(DocumentProblem):
    """The document is not something we ingest: binary, an unknown format, no text."""


# Codes that mean "the service cannot answer now", as opposed to "this request is wrong".
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def service_error(
    error: grpc.aio.AioRpcError, service: str, target: str, doing: str
) -> IngestError:
    """The exception for a failed call to a daert service: `ServiceUnavailable` when a retry
    may succeed, else `IngestError`; the message names the service, its target and the call."""
    message = f"{doing}: the {service} service at {target} answered {error.code().name}: "
    message += error.details() or "(no details)"
    if error.code() in RETRYABLE_CODES:
        return ServiceUnavailable(message)
    return IngestError(message)
