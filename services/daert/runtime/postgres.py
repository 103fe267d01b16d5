"""PostgreSQL for the services that keep data there (retrieval's pgvector backend, the LoRA
registry): a connection pool, versioned migrations applied before first use, and database
failures as service errors. Each service lists its migrations and names its own bookkeeping
table and advisory lock, so several services can share one database."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql

from daert.runtime.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("daert.postgres")


class ConnectionLost(Unavailable):
    """A pooled connection broke (the server restarted): the pool has dropped it, so an
    idempotent call may try once more at once."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: str  # one or more SQL statements, run in the migration's transaction


async def migrate(
    conn: psycopg.AsyncConnection[Any],
    migrations: Sequence[Migration],
    *,
    table: str,
    lock_key: int,
) -> list[int]:
    """Apply the migrations this database lacks, in one transaction under an advisory lock
    (replicas starting together apply each once); returns the versions applied."""
    applied_now = []
    bookkeeping = sql.Identifier(table)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        await conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                   version integer PRIMARY KEY,
                   description text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
            ).format(bookkeeping)
        )
        cursor = await conn.execute(sql.SQL("SELECT version FROM {}").format(bookkeeping))
        done = {row[0] for row in await cursor.fetchall()}
        for migration in migrations:
            if migration.version in done:
                continue
            await conn.execute(migration.statements.encode())
            await conn.execute(
                sql.SQL("INSERT INTO {} (version, description) VALUES (%s, %s)").format(
                    bookkeeping
                ),
                (migration.version, migration.description),
            )
            applied_now.append(migration.version)
    return applied_now


class PostgresDatabase:
    """The pool opens without waiting for the database, which may come up after the
    service: until the migrations have run, every use tries them first."""

    def __init__(
        self,
        dsn: str,
        *,
        migrations: Sequence[Migration],
        migrations_table: str,
        lock_key: int,
        pool_min_size: int,
        pool_max_size: int,
        connect_timeout_s: float,
        connection_kwargs: dict[str, Any] | None = None,
        configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._migrations = migrations
        self._migrations_table = migrations_table
        self._lock_key = lock_key
        self._connect_timeout = max(2, math.ceil(connect_timeout_s))  # libpq: >= 2 s
        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=pool_min_size,
            max_size=pool_max_size,
            kwargs={
                "autocommit": True,
                "connect_timeout": self._connect_timeout,
                **(connection_kwargs or {}),
            },
            configure=configure,
            timeout=connect_timeout_s,
            open=False,
        )
        self._schema_ready = False

    async def start(self) -> None:
        try:
            await self.ensure_schema()
        except Unavailable as exc:
            log.warning("PostgreSQL is not reachable yet; serving once it is: %s", exc)
        await self.pool.open(wait=False)

    async def ready(self) -> bool:
        try:
            async with self.connection() as conn:
                await conn.execute("SELECT 1")
        except Unavailable:
            return False
        return True

    async def close(self) -> None:
        await self.pool.close()

    async def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        # On a connection of its own: pooled connections may need types (pgvector's) that
        # a migration creates.
        try:
            async with await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=self._connect_timeout
            ) as conn:
                applied = await migrate(
                    conn, self._migrations, table=self._migrations_table, lock_key=self._lock_key
                )
        except psycopg.OperationalError as exc:
            raise Unavailable(f"PostgreSQL is not reachable: {exc}") from None
        if applied:
            log.info("applied schema migrations", extra={"versions": applied})
        self._schema_ready = True

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection, with database failures turned into service errors."""
        await self.ensure_schema()
        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise Unavailable(f"PostgreSQL is not reachable: {exc}") from None
        except psycopg.errors.QueryCanceled:
            raise DeadlineExceeded("the database query was cancelled") from None
        except psycopg.OperationalError as exc:
            # Connections broken by a database restart are dropped here, so at most the
            # calls already holding one fail (UNAVAILABLE, which clients retry); checking
            # every connection before use would cost a round trip per call instead.
            await self.pool.check()
            raise ConnectionLost(f"PostgreSQL connection failed: {exc}") from None
