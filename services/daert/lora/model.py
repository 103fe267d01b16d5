"""The router's plain data: adapters as stored, and the decisions Route makes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as a client registers it (validated)."""

    name: str
    source: str
    base_model: str
    description: str
    examples: tuple[str, ...]
    tenants: tuple[str, ...]  # empty: every tenant


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter as stored in the registry."""

    spec: AdapterSpec
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return self.spec.name

    def allows(self, tenant: str) -> bool:
        return not self.spec.tenants or tenant in self.spec.tenants


class Reason(Enum):
    """Why Route chose an adapter; mirrors daert.v1.RouteReason."""

    EXPLICIT = "explicit"
    TENANT_DEFAULT = "tenant_default"
    SEMANTIC = "semantic"
    BELOW_THRESHOLD = "base_model_fallback_below_threshold"
    NO_CANDIDATES = "base_model_fallback_no_candidates"
    BASE_REQUESTED = "base_model_requested"


@dataclass(frozen=True)
class AdapterChoice:
    """Which adapter a request gets (None: the base model) and why."""

    adapter: AdapterRecord | None
    base_model: str
    reason: Reason
    score: float | None = None  # best semantic candidate's cosine, when one was compared
