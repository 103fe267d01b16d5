"""The response cache in Redis: exact-match entries, and an optional semantic index.

An entry is keyed by a hash of everything that changes the answer: backend kind, model,
requested adapter, tenant, the messages or prompt, every sampling parameter and the
response format, the tools and tool choice when there are any, and whether (and how many
alternatives) log probabilities were asked for. It keeps the text (as the deltas it was
generated in) with each delta's log probabilities when asked for, the whole tool calls,
finish reason, usage and where it ran; a streaming call gets it replayed as a stream with
the same first and last messages, its text usually in one delta (deltas that are all ready
at once go out merged, see `relay.merge_backlog`), each tool call in one delta. Only
finished answers (stop, length, stop sequence, tool calls) are stored, never a cut-off or
failed one.

The semantic index answers a request whose last user message is close enough (embedding
cosine) to one answered before, when everything else is identical: its scope hashes all
the other fields, so a hit never crosses a model, an adapter, a tenant, a parameter or
an earlier turn of the conversation. Redis (7, no search module) holds each scope's vectors
in one hash, capped at `max_entries` newest; a lookup compares them with numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
from prometheus_client import Counter

from daert.clients import EmbeddingClient
from daert.generation.request import GenerationInput
from daert.runtime.redis_state import RedisState
from daert.v1 import embedding_pb2, generation_pb2

log = logging.getLogger("daert.generation")

CACHE_LOOKUPS = Counter(
    "daert_generation_cache_lookups_total",
    "Response-cache lookups by result: hit, semantic_hit, miss.",
    ["result"],
)
SEMANTIC_ERRORS = Counter(
    "daert_generation_semantic_cache_errors_total",
    "Semantic-cache embeddings that failed; the request went on without it.",
)

_PREFIX = "daert:generation:v1"
STORED_REASONS = frozenset(
    {
        generation_pb2.FINISH_REASON_STOP,
        generation_pb2.FINISH_REASON_LENGTH,
        generation_pb2.FINISH_REASON_STOP_SEQUENCE,
        generation_pb2.FINISH_REASON_TOOL_CALLS,
    }
)


@dataclass(frozen=True)
class CachedAnswer:
    deltas: list[str]
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    model: str
    adapter_id: str
    backend: int
    replica: str
    # [id, name, arguments] per call; entries stored before tool calling have none.
    tool_calls: list[list[str]] = field(default_factory=list)
    # Per delta, [token, logprob, [[token, logprob], ...]] per token; only for requests that
    # asked for log probabilities (the key says so), empty otherwise.
    logprobs: list[list[list[Any]]] = field(default_factory=list)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> CachedAnswer | None:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None  # written by another version: a miss, overwritten on store


@dataclass(frozen=True)
class CacheKey:
    exact: str  # the entry's Redis key
    # The semantic index it belongs to; None when the request has no user message to compare.
    scope: str | None
    text: str  # what the semantic index compares


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_key(
    backend: str, model: str, adapter: str, tenant: str, request: GenerationInput
) -> CacheKey:
    fields = {"backend": backend, "model": model, "adapter": adapter, "tenant": tenant}
    canonical = request.canonical()
    exact = f"{_digest(fields | canonical)}"
    # The scope is everything but the text compared: the last user message (or prompt).
    if request.prompt is not None:
        canonical["prompt"] = None
    else:
        users = [i for i, m in enumerate(canonical["messages"]) if m[0] == "user"]
        if not users:  # e.g. system and assistant turns only: exact matches only
            return CacheKey(exact=f"{_PREFIX}:answer:{exact}", scope=None, text="")
        messages = canonical["messages"]
        canonical["messages"] = messages[: users[-1]]
        # Turns after the last user message (a tool call and its result) stay in the scope:
        # without them a tool result would be answered with the earlier call again.
        if after := messages[users[-1] + 1 :]:
            canonical["after_last_user"] = after
    return CacheKey(
        exact=f"{_PREFIX}:answer:{exact}",
        scope=f"{_PREFIX}:semantic:{_digest(fields | canonical)}",
        text=request.last_user_message(),
    )


class ResponseCache:
    def __init__(
        self,
        redis: RedisState,
        ttl_s: int,
        semantic: SemanticIndex | None,
    ) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._semantic = semantic

    async def lookup(self, key: CacheKey) -> CachedAnswer | None:
        raw = await self._redis.attempt("get", lambda: self._redis.client.get(key.exact), None)
        answer = CachedAnswer.loads(raw) if raw else None
        if answer is None and self._semantic is not None:
            similar = await self._semantic.find(key)
            if similar:
                raw = await self._redis.attempt(
                    "get", lambda: self._redis.client.get(similar), None
                )
                answer = CachedAnswer.loads(raw) if raw else None
                if answer is not None:
                    CACHE_LOOKUPS.labels("semantic_hit").inc()
                    return answer
        CACHE_LOOKUPS.labels("hit" if answer else "miss").inc()
        return answer

    async def store(self, key: CacheKey, answer: CachedAnswer) -> None:
        if answer.finish_reason not in STORED_REASONS:
            return
        await self._redis.attempt(
            "set", lambda: self._redis.client.set(key.exact, answer.dumps(), ex=self._ttl_s), None
        )
        if self._semantic is not None:
            await self._semantic.add(key)

    async def close(self) -> None:
        await self._redis.close()
        if self._semantic is not None:
            await self._semantic.close()


class SemanticIndex:
    def __init__(
        self,
        redis: RedisState,
        threshold: float,
        embedding_model: str,
        max_entries: int,
        ttl_s: int,
    ) -> None:
        self._redis = redis
        self._threshold = threshold
        self._model = embedding_model
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        # Made on first use: a gRPC channel belongs to the event loop it was made in.
        self._embeddings: EmbeddingClient | None = None
        # Vectors computed by find(), reused by add() for the same text.
        self._recent: dict[str, bytes] = {}

    async def _vector(self, text: str) -> bytes | None:
        if text in self._recent:
            return self._recent[text]
        if self._embeddings is None:
            self._embeddings = EmbeddingClient(timeout_s=5.0, max_attempts=1)
        try:
            [vector] = await self._embeddings.embed_texts(
                [text], model=self._model, input_type=embedding_pb2.INPUT_TYPE_QUERY
            )
        except Exception as exc:  # a grpc.aio.AioRpcError or a broken channel
            SEMANTIC_ERRORS.inc()
            log.warning("semantic cache: embedding failed; skipping it", extra={"error": str(exc)})
            return None
        packed = np.asarray(vector, dtype=np.float32).tobytes()
        if len(self._recent) > 1024:  # only the texts between a find() and its add()
            self._recent.clear()
        self._recent[text] = packed
        return packed

    async def find(self, key: CacheKey) -> str | None:
        """The exact key of the most similar stored request in `key`'s scope, if any reaches
        the threshold."""
        scope = key.scope
        if scope is None:
            return None
        vector = await self._vector(key.text)
        if vector is None:
            return None
        stored: dict[bytes | str, bytes | str] = await self._redis.attempt(
            "semantic_find", lambda: self._redis.client.hgetall(scope), {}
        )
        # The client returns bytes (no decode_responses), as packed vectors need.
        vectors = cast(dict[bytes, bytes], stored)
        if not vectors:
            return None
        names = list(vectors)
        matrix = np.frombuffer(b"".join(vectors[n] for n in names), dtype=np.float32)
        query = np.frombuffer(vector, dtype=np.float32)
        if matrix.size != query.size * len(names):
            return None  # vectors of another embedding model: never compare across models
        scores = matrix.reshape(len(names), -1) @ query  # both sides are unit vectors
        best = int(np.argmax(scores))
        return names[best].decode() if scores[best] >= self._threshold else None

    async def add(self, key: CacheKey) -> None:
        scope = key.scope
        if scope is None:
            return
        vector = await self._vector(key.text)
        self._recent.pop(key.text, None)
        if vector is None:
            return
        order = f"{scope}:order"

        async def add_and_trim() -> None:
            async with self._redis.client.pipeline(transaction=True) as pipe:
                pipe.hset(scope, key.exact, vector)
                pipe.zadd(order, {key.exact: time.time()})
                pipe.expire(scope, self._ttl_s)
                pipe.expire(order, self._ttl_s)
                await pipe.execute()
            # Drop the oldest beyond the cap (and entries whose answers have expired).
            excess = await self._redis.client.zrange(order, 0, -self._max_entries - 1)
            if excess:
                await self._redis.client.hdel(scope, *excess)
                await self._redis.client.zrem(order, *excess)

        await self._redis.attempt("semantic_add", add_and_trim, None)

    async def close(self) -> None:
        if self._embeddings is not None:
            await self._embeddings.close()
