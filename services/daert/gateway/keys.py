"""The gateway's API keys in PostgreSQL: bearer tokens bound to a tenant, the models and
collections they may use and their optional limits. Only a token's SHA-256 digest is stored;
the plain token is shown once, by `create`.

A token is `dk-<id>-<secret>`: the id part is the key's public id (what `daert keys list`
shows and `revoke` takes), so a leaked token can be traced to its key; the secret is 256
random bits. Such a token is looked up by its digest, not compared against anything: a fast
hash is enough (there is no password to brute-force) and keeps authentication cheap.

Authentication is on every request's path, so recent successes are cached in-process for
`cache_ttl_s`: a revocation reaches the other replicas within that time. While PostgreSQL is
unreachable, a key that was active within `stale_grace_s` past its cache time is still
accepted, so a database restart does not turn away the callers of a moment ago."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from daert.runtime.errors import DeadlineExceeded, Unavailable
from daert.runtime.postgres import ConnectionLost, Migration, PostgresDatabase

log = logging.getLogger("daert.gateway.keys")

TOKEN_PREFIX = "dk-"
# Longer bearer values are not ours: refused without a database query.
_MAX_TOKEN_CHARS = 256
# Bounds the cache under a flood of distinct valid keys; far above any real key count.
_CACHE_MAX_ENTRIES = 10_000

MIGRATIONS = [
    Migration(
        1,
        "API keys",
        """
        CREATE TABLE daert_gateway_api_keys (
            id text PRIMARY KEY,
            token_sha256 bytea NOT NULL UNIQUE,
            name text NOT NULL,
            tenant text NOT NULL,
            models text[] NOT NULL,
            collections text[] NOT NULL,
            rpm_limit integer CHECK (rpm_limit > 0),
            tpm_limit integer CHECK (tpm_limit > 0),
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        );
        """,
    ),
]
# Its own bookkeeping table and lock, so it can share a database with retrieval and LoRA.
MIGRATIONS_TABLE = "daert_gateway_schema_migrations"
MIGRATION_LOCK = 0x6B_65_79_73  # "keys"

_COLUMNS = "id, name, tenant, models, collections, rpm_limit, tpm_limit, created_at, revoked_at"


class KeyStoreUnavailable(Exception):
    """PostgreSQL could not be reached in time; the gateway answers 503, the CLI exits 2."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    tenant: str
    models: tuple[str, ...]  # empty: every model
    collections: tuple[str, ...]  # empty: every collection
    rpm_limit: int | None
    tpm_limit: int | None
    created_at: datetime
    revoked_at: datetime | None

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    def allows_collection(self, collection: str) -> bool:
        return not self.collections or collection in self.collections


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _key(row: DictRow) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        tenant=row["tenant"],
        models=tuple(row["models"]),
        collections=tuple(row["collections"]),
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _names(values: Iterable[str], what: str) -> list[str]:
    """Stripped, without duplicates, in the order given."""
    names = list(dict.fromkeys(value.strip() for value in values))
    if "" in names:
        raise ValueError(f"an empty {what} name")
    return names


def _limit(value: int | None, what: str) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{what} must be at least 1 (or none)")
    return value


class KeyStore:
    def __init__(
        self,
        dsn: str,
        *,
        cache_ttl_s: float = 5.0,
        pool_max_size: int = 8,
        connect_timeout_s: float = 2.0,
        stale_grace_s: float = 300.0,
    ) -> None:
        self._db = PostgresDatabase(
            dsn,
            migrations=MIGRATIONS,
            migrations_table=MIGRATIONS_TABLE,
            lock_key=MIGRATION_LOCK,
            pool_min_size=1,
            pool_max_size=pool_max_size,
            connect_timeout_s=connect_timeout_s,
            connection_kwargs={"row_factory": dict_row},
        )
        self._cache_ttl_s = cache_ttl_s
        self._stale_grace_s = stale_grace_s
        self._cache: dict[bytes, tuple[float, ApiKey]] = {}  # digest -> (expiry, key)

    async def open(self, *, require_database: bool = False) -> None:
        """Open the pool and create the schema. The gateway may start before PostgreSQL
        (requests get 503 until it answers); the CLI passes `require_database` to fail now."""
        if require_database:
            try:
                await self._db.ensure_schema()
            except Unavailable as exc:
                raise KeyStoreUnavailable(f"the API key store is unavailable: {exc}") from None
        await self._db.start()

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> bool:
        return await self._db.ready()

    async def create(
        self,
        *,
        tenant: str,
        name: str = "",
        models: Iterable[str] = (),
        collections: Iterable[str] = (),
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key; the plain token is returned here and never again."""
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        key = await self._upsert(
            token, key_id, tenant, name, models, collections, rpm_limit, tpm_limit
        )
        return token, key

    async def ensure(
        self,
        token: str,
        *,
        tenant: str,
        name: str = "",
        models: Iterable[str] = (),
        collections: Iterable[str] = (),
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
    ) -> ApiKey:
        """Register a given token (`daert up`'s development key, kept in its state folder),
        or update the key it already is to these settings. A revoked key stays revoked."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
            raise ValueError(f"an API key starts with {TOKEN_PREFIX!r}, within 256 characters")
        if len(token) < len(TOKEN_PREFIX) + 32:
            raise ValueError("an API key needs at least 32 characters after its prefix")
        return await self._upsert(
            token, secrets.token_hex(6), tenant, name, models, collections, rpm_limit, tpm_limit
        )

    async def _upsert(
        self,
        token: str,
        key_id: str,
        tenant: str,
        name: str,
        models: Iterable[str],
        collections: Iterable[str],
        rpm_limit: int | None,
        tpm_limit: int | None,
    ) -> ApiKey:
        values = (
            key_id,
            _digest(token),
            name,
            tenant,
            _names(models, "model"),
            _names(collections, "collection"),
            _limit(rpm_limit, "rpm_limit"),
            _limit(tpm_limit, "tpm_limit"),
        )
        row = await self._one(
            f"""INSERT INTO daert_gateway_api_keys
                (id, token_sha256, name, tenant, models, collections, rpm_limit, tpm_limit)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (token_sha256) DO UPDATE SET
                name = EXCLUDED.name, tenant = EXCLUDED.tenant, models = EXCLUDED.models,
                collections = EXCLUDED.collections, rpm_limit = EXCLUDED.rpm_limit,
                tpm_limit = EXCLUDED.tpm_limit
            RETURNING {_COLUMNS}""",
            values,
        )
        assert row is not None  # RETURNING always yields the row
        self._forget(row["id"])
        return _key(row)

    async def authenticate(self, token: str) -> ApiKey | None:
        """The active key this token is, or None (unknown or revoked). Raises
        KeyStoreUnavailable when PostgreSQL cannot say and the key is not cached."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = _digest(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            row = await self._find(digest)
        except KeyStoreUnavailable:
            # A key seen active shortly before stays trusted while PostgreSQL is away (a
            # restart, a failover): a revocation it could not have seen waits for it.
            if cached is not None and now - cached[0] < self._stale_grace_s:
                return cached[1]
            raise
        self._cache.pop(digest, None)  # re-added below at the end: the dict stays oldest first
        if row is None:
            # Unknown tokens are not cached: a key created a moment ago must work at once.
            return None
        key = _key(row)
        if self._cache_ttl_s > 0:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache = {d: e for d, e in self._cache.items() if e[0] > now}
                if len(self._cache) >= _CACHE_MAX_ENTRIES:
                    del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[digest] = (now + self._cache_ttl_s, key)
        return key

    async def _find(self, digest: bytes) -> DictRow | None:
        query = f"""SELECT {_COLUMNS} FROM daert_gateway_api_keys
            WHERE token_sha256 = %s AND revoked_at IS NULL"""
        try:
            return await self._one(query, (digest,), lost_is_unavailable=False)
        except ConnectionLost:  # after a database restart: the pool has dropped that one
            return await self._one(query, (digest,))

    async def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM daert_gateway_api_keys {where} ORDER BY created_at, id"
            )
            rows = await cursor.fetchall()
        return [_key(row) for row in rows]

    async def revoke(self, key_id: str) -> bool:
        """True when an active key was revoked; False when none has this id (or it already
        was). This process forgets it at once, other replicas within their cache TTL."""
        row = await self._one(
            """UPDATE daert_gateway_api_keys SET revoked_at = now()
            WHERE id = %s AND revoked_at IS NULL RETURNING id""",
            (key_id,),
        )
        self._forget(key_id)
        return row is not None

    def _forget(self, key_id: str) -> None:
        self._cache = {d: e for d, e in self._cache.items() if e[1].id != key_id}

    async def _one(
        self, query: str, params: tuple[Any, ...], *, lost_is_unavailable: bool = True
    ) -> DictRow | None:
        async with self._connection(lost_is_unavailable) as conn:
            cursor = await conn.execute(query.encode(), params)
            row: DictRow | None = await cursor.fetchone()
        return row

    @asynccontextmanager
    async def _connection(
        self, lost_is_unavailable: bool = True
    ) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """A pooled connection; the database's service errors become KeyStoreUnavailable
        (a lost connection too, unless the caller retries it)."""
        try:
            async with self._db.connection() as conn:
                yield conn
        except ConnectionLost as exc:
            if not lost_is_unavailable:
                raise
            raise KeyStoreUnavailable(f"the API key store is unavailable: {exc}") from None
        except (Unavailable, DeadlineExceeded) as exc:
            raise KeyStoreUnavailable(f"the API key store is unavailable: {exc}") from None
