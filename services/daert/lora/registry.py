"""The adapter registry in PostgreSQL: adapters and tenant defaults, behind versioned
migrations applied at start-up under an advisory lock (replicas starting together apply each
one exactly once). Append new migrations; never edit an applied one.

Database failures surface as UNAVAILABLE, fast (the pool's connect timeout), and the
readiness check reports them, so health follows the database down and back up."""

from __future__ import annotations

import logging

from psycopg.rows import DictRow, dict_row

from daert.lora.config import LoraSettings
from daert.lora.model import AdapterRecord, AdapterSpec
from daert.runtime.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
)
from daert.runtime.postgres import Migration, PostgresDatabase

log = logging.getLogger("daert.lora.registry")

MIGRATIONS = [
    Migration(
        1,
        "adapters and tenant defaults",
        """
        CREATE TABLE daert_lora_adapters (
            name text PRIMARY KEY,
            source text NOT NULL,
            base_model text NOT NULL,
            description text NOT NULL,
            examples text[] NOT NULL,
            tenants text[] NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX daert_lora_adapters_base_model ON daert_lora_adapters (base_model);
        CREATE TABLE daert_lora_tenant_defaults (
            tenant text PRIMARY KEY,
            adapter text NOT NULL REFERENCES daert_lora_adapters (name) ON DELETE CASCADE,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX daert_lora_tenant_defaults_adapter ON daert_lora_tenant_defaults (adapter);
        """,
    ),
]

# The router's own migrations table and lock key, so it can share a database with the
# retrieval service (whose pgvector backend keeps `daert_schema_migrations`).
MIGRATIONS_TABLE = "daert_lora_schema_migrations"
MIGRATION_LOCK = 0x6C_6F_72_61  # "lora"

_COLUMNS = "name, source, base_model, description, examples, tenants, created_at, updated_at"


def _record(row: DictRow) -> AdapterRecord:
    spec = AdapterSpec(
        name=row["name"],
        source=row["source"],
        base_model=row["base_model"],
        description=row["description"],
        examples=tuple(row["examples"]),
        tenants=tuple(row["tenants"]),
    )
    return AdapterRecord(spec, row["created_at"], row["updated_at"])


class AdapterRegistry:
    def __init__(self, settings: LoraSettings) -> None:
        assert settings.dsn is not None  # LoraSettings requires it
        self._db = PostgresDatabase(
            settings.dsn.get_secret_value(),
            migrations=MIGRATIONS,
            migrations_table=MIGRATIONS_TABLE,
            lock_key=MIGRATION_LOCK,
            pool_min_size=settings.pool_min_size,
            pool_max_size=settings.pool_max_size,
            connect_timeout_s=settings.connect_timeout_s,
            connection_kwargs={"row_factory": dict_row},
        )

    async def start(self) -> None:
        await self._db.start()

    async def ready(self) -> bool:
        return await self._db.ready()

    async def close(self) -> None:
        await self._db.close()

    # --- adapters --------------------------------------------------------------------------

    async def register(
        self, spec: AdapterSpec, replace: bool
    ) -> tuple[AdapterRecord, AdapterRecord | None]:
        """Store `spec`; returns it as stored and the adapter it replaced, if any."""
        values = (
            spec.name,
            spec.source,
            spec.base_model,
            spec.description,
            list(spec.examples),
            list(spec.tenants),
        )
        async with self._db.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM daert_lora_adapters WHERE name = %s FOR UPDATE",
                (spec.name,),
            )
            old_row = await cursor.fetchone()
            previous = _record(old_row) if old_row else None
            if previous is not None and not replace:
                raise AlreadyExists(
                    f"adapter {spec.name!r} is already registered; set replace to overwrite it"
                )
            # ON CONFLICT: a concurrent first registration of the same name (no row to
            # lock above) either wins here or raises; replace makes the later one win.
            conflict = (
                """DO UPDATE SET source = EXCLUDED.source, base_model = EXCLUDED.base_model,
                       description = EXCLUDED.description, examples = EXCLUDED.examples,
                       tenants = EXCLUDED.tenants, updated_at = now()"""
                if replace
                else "DO NOTHING"
            )
            cursor = await conn.execute(
                f"""INSERT INTO daert_lora_adapters
                       (name, source, base_model, description, examples, tenants)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (name) {conflict}
                   RETURNING {_COLUMNS}""",
                values,
            )
            row = await cursor.fetchone()
            if row is None:
                raise AlreadyExists(f"adapter {spec.name!r} was registered concurrently")
            if spec.tenants:
                # A default the tenant may no longer use would route it to an adapter it
                # was just denied.
                await conn.execute(
                    """DELETE FROM daert_lora_tenant_defaults
                       WHERE adapter = %s AND NOT tenant = ANY(%s)""",
                    (spec.name, list(spec.tenants)),
                )
        return _record(row), previous

    async def delete(self, name: str) -> AdapterRecord | None:
        """Remove an adapter (its tenant defaults go with it); returns what was removed."""
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                f"DELETE FROM daert_lora_adapters WHERE name = %s RETURNING {_COLUMNS}", (name,)
            )
            row = await cursor.fetchone()
        return _record(row) if row else None

    async def get(self, name: str) -> AdapterRecord | None:
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM daert_lora_adapters WHERE name = %s", (name,)
            )
            row = await cursor.fetchone()
        return _record(row) if row else None

    async def list_adapters(self, base_model: str, tenant: str) -> list[AdapterRecord]:
        """Adapters sorted by name; an empty `base_model` or `tenant` does not filter."""
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                f"""SELECT {_COLUMNS} FROM daert_lora_adapters
                    WHERE (%(base)s = '' OR base_model = %(base)s)
                      AND (%(tenant)s = '' OR cardinality(tenants) = 0
                           OR %(tenant)s = ANY(tenants))
                    ORDER BY name""",
                {"base": base_model, "tenant": tenant},
            )
            rows = await cursor.fetchall()
        return [_record(row) for row in rows]

    async def semantic_candidates(self, base_model: str, tenant: str) -> list[AdapterRecord]:
        """Adapters "auto" may choose: for `base_model`, usable by `tenant`, with examples or
        a description (not blank) to compare the request with."""
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                f"""SELECT {_COLUMNS} FROM daert_lora_adapters
                    WHERE base_model = %(base)s
                      AND (cardinality(examples) > 0 OR description ~ '\\S')
                      AND (cardinality(tenants) = 0 OR %(tenant)s = ANY(tenants))
                    ORDER BY name""",
                {"base": base_model, "tenant": tenant},
            )
            rows = await cursor.fetchall()
        return [_record(row) for row in rows]

    # --- tenant defaults -------------------------------------------------------------------

    async def tenant_default(self, tenant: str) -> AdapterRecord | None:
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                f"""SELECT {", ".join("a." + c for c in _COLUMNS.split(", "))}
                    FROM daert_lora_tenant_defaults d
                    JOIN daert_lora_adapters a ON a.name = d.adapter
                    WHERE d.tenant = %s""",
                (tenant,),
            )
            row = await cursor.fetchone()
        return _record(row) if row else None

    async def set_tenant_default(self, tenant: str, adapter: str) -> str:
        """Set (or, with an empty `adapter`, clear) a tenant's default; returns the previous
        one ("" when none)."""
        async with self._db.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT adapter FROM daert_lora_tenant_defaults WHERE tenant = %s FOR UPDATE",
                (tenant,),
            )
            row = await cursor.fetchone()
            previous: str = row["adapter"] if row else ""
            if not adapter:
                await conn.execute(
                    "DELETE FROM daert_lora_tenant_defaults WHERE tenant = %s", (tenant,)
                )
                return previous
            # FOR SHARE: a concurrent delete or replace of the adapter waits for this.
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM daert_lora_adapters WHERE name = %s FOR SHARE",
                (adapter,),
            )
            found = await cursor.fetchone()
            if found is None:
                raise NotFound(f"adapter {adapter!r} is not registered")
            if not _record(found).allows(tenant):
                raise PermissionDenied(f"tenant {tenant!r} may not use adapter {adapter!r}")
            await conn.execute(
                """INSERT INTO daert_lora_tenant_defaults (tenant, adapter) VALUES (%s, %s)
                   ON CONFLICT (tenant) DO UPDATE
                   SET adapter = EXCLUDED.adapter, updated_at = now()""",
                (tenant, adapter),
            )
        return previous

    async def tenant_defaults(self) -> list[tuple[str, str]]:
        """(tenant, adapter) for every tenant with a default, sorted by tenant."""
        async with self._db.connection() as conn:
            cursor = await conn.execute(
                "SELECT tenant, adapter FROM daert_lora_tenant_defaults ORDER BY tenant"
            )
            rows = await cursor.fetchall()
        return [(row["tenant"], row["adapter"]) for row in rows]
