"""Rolling summaries in Redis, one per tenant and conversation: what the condensed part of a
conversation was summarised into, and exactly which messages that covered (a fingerprint),
so the next call only folds in the turns that are new and an edited history is noticed.

Redis is an optimisation: when it is down a call is answered stateless (every turn
summarised again), counted in daert_redis_errors_total."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from daert.runtime.errors import Unavailable
from daert.runtime.redis_state import RedisState


@dataclass(frozen=True)
class StoredSummary:
    tenant: str
    covered: int  # how many of the conversation's first non-system messages it summarises
    fingerprint: str  # of those messages (daert.context.messages.fingerprint)
    text: str
    strategy: int  # the CompressionStrategy that wrote it


def _key(tenant: str, conversation_id: str) -> str:
    # Hashed: ids are any text, and no tenant's key can be spelled from another's.
    scope = hashlib.sha256(json.dumps([tenant, conversation_id]).encode()).hexdigest()
    return f"daert:context:summary:{scope}"


class RollingSummaries:
    def __init__(self, redis: RedisState | None, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def get(self, tenant: str, conversation_id: str) -> StoredSummary | None:
        if self._redis is None:
            return None
        client = self._redis.client
        raw = await self._redis.attempt(
            "summary_get", lambda: client.get(_key(tenant, conversation_id)), None
        )
        if raw is None:
            return None
        try:
            stored = StoredSummary(**json.loads(raw))
        except (TypeError, ValueError):
            return None  # written by another version: summarise afresh
        return stored if stored.tenant == tenant else None

    async def put(self, conversation_id: str, summary: StoredSummary) -> None:
        if self._redis is None:
            return
        client = self._redis.client
        key, value = _key(summary.tenant, conversation_id), json.dumps(asdict(summary))
        await self._redis.attempt(
            "summary_put", lambda: client.set(key, value, ex=self._ttl_s), None
        )

    async def delete(self, tenant: str, conversation_id: str) -> bool:
        """True when a summary was deleted; UNAVAILABLE when Redis cannot say."""
        if self._redis is None:
            return False
        client = self._redis.client
        deleted = await self._redis.attempt(
            "summary_delete", lambda: client.delete(_key(tenant, conversation_id)), None
        )
        if deleted is None:
            raise Unavailable(f"Redis at {self._redis.where} is unreachable; nothing was deleted")
        return bool(deleted)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
