"""Versioned schema migrations for the services that keep data in PostgreSQL (retrieval,
the LoRA router): each service lists its migrations and names its own bookkeeping table and
advisory lock, so several services can share one database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql


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
