"""The pgvector backend's schema: versioned migrations for the catalog, and the DDL of one
collection's chunk table.

Migrations run at start-up under an advisory lock, so replicas starting together apply each
one exactly once. Append new migrations; never edit an applied one.
"""

from __future__ import annotations

from psycopg import sql

from daert.retrieval.model import CollectionSpec, Metric
from daert.runtime.postgres import Migration

MIGRATIONS = [
    Migration(
        1,
        "catalog of collections",
        """
        CREATE EXTENSION IF NOT EXISTS vector;
        CREATE TABLE daert_collections (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            name text NOT NULL,
            dimensions integer NOT NULL,
            metric text NOT NULL,
            hnsw_m integer NOT NULL,
            hnsw_ef_construction integer NOT NULL,
            text_search_language text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (tenant, name)
        );
        """,
    ),
]

# Any fixed number: the key of the advisory lock that serialises migrations.
MIGRATION_LOCK = 0x64_61_65_72_74
MIGRATIONS_TABLE = "daert_schema_migrations"

_OPERATOR_CLASS = {
    Metric.COSINE: "vector_cosine_ops",
    Metric.DOT: "vector_ip_ops",
    Metric.L2: "vector_l2_ops",
}


def chunk_table(collection_id: int) -> sql.Identifier:
    return sql.Identifier(f"daert_chunks_{collection_id}")


def create_chunk_table(collection_id: int, spec: CollectionSpec) -> list[sql.Composed]:
    """DDL for a collection's chunk table: one table per collection, because a vector
    column (and its HNSW index) has one fixed length."""
    table = chunk_table(collection_id)
    return [
        sql.SQL(
            """CREATE TABLE {table} (
                tenant text NOT NULL,
                id text NOT NULL,
                document_id text NOT NULL,
                content_hash bytea NOT NULL,
                text text NOT NULL,
                embedding vector({dimensions}) NOT NULL,
                metadata jsonb NOT NULL,
                tsv tsvector GENERATED ALWAYS AS (to_tsvector({language}::regconfig, text)) STORED,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (tenant, id))"""
        ).format(
            table=table,
            dimensions=sql.Literal(spec.dimensions),
            language=sql.Literal(spec.text_search_language),
        ),
        sql.SQL(
            "CREATE INDEX ON {table} USING hnsw (embedding {ops}) "
            "WITH (m = {m}, ef_construction = {ef})"
        ).format(
            table=table,
            ops=sql.SQL(_OPERATOR_CLASS[spec.metric]),
            m=sql.Literal(spec.hnsw_m),
            ef=sql.Literal(spec.hnsw_ef_construction),
        ),
        sql.SQL("CREATE INDEX ON {table} USING gin (tsv)").format(table=table),
        sql.SQL("CREATE INDEX ON {table} USING gin (metadata jsonb_path_ops)").format(table=table),
        sql.SQL("CREATE INDEX ON {table} (tenant, document_id)").format(table=table),
    ]
