"""`daert keys create | list | revoke`: the gateway's API keys, in the PostgreSQL named by
DAERT_GATEWAY_DSN (the gateway's own setting). A new key is printed once; only its hash is
kept, so a lost key is revoked and replaced, never recovered."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from typing import Any

import psycopg
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from daert.gateway.keys import ApiKey, KeyStore, KeyStoreUnavailable


class KeysSettings(BaseSettings):
    """Just the key store's DSN: the rest of the gateway's settings do not concern the CLI."""

    model_config = SettingsConfigDict(env_prefix="DAERT_GATEWAY_", extra="ignore")

    dsn: SecretStr = SecretStr("")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parsers(commands: Any) -> None:
    """Adds `keys` to the `daert` subcommands (an argparse subparsers object)."""
    keys = commands.add_parser("keys", help="create, list and revoke the gateway's API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--name", default="", help="what the key is for")
    for flag, dest, what in (
        ("--model", "models", "model"),
        ("--collection", "collections", "RAG collection"),
    ):
        create.add_argument(
            flag, dest=dest, metavar=what.split()[-1].upper(), nargs="+", action="extend",
            default=[], help=f"allowed {what}s (repeatable); default: every {what}",
        )  # fmt: skip
    create.add_argument(
        "--rpm", type=_positive, metavar="N", help="requests per minute (default: no limit)"
    )
    create.add_argument(
        "--tpm", type=_positive, metavar="N", help="tokens per minute (default: no limit)"
    )

    listing = actions.add_parser("list", help="list the keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")


def run(args: argparse.Namespace) -> int:
    dsn = KeysSettings().dsn.get_secret_value()
    if not dsn:
        print("error: set DAERT_GATEWAY_DSN to the key store's PostgreSQL DSN", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, dsn))
    except KeyStoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (psycopg.Error, ValueError) as exc:  # a malformed DSN, an empty model name
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, dsn: str) -> int:
    store = KeyStore(dsn, cache_ttl_s=0, pool_max_size=1)
    await store.open(require_database=True)
    try:
        if args.keys_command == "create":
            return await _create(store, args)
        if args.keys_command == "list":
            print(_table(await store.list(include_revoked=args.all)))
            return 0
        if await store.revoke(args.key_id):
            print(f"revoked key {args.key_id}")
            return 0
        print(f"error: no active key with id {args.key_id!r}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    token, key = await store.create(
        tenant=args.tenant,
        name=args.name,
        models=args.models,
        collections=args.collections,
        rpm_limit=args.rpm,
        tpm_limit=args.tpm,
    )
    print(f"created key {key.id} for tenant {key.tenant!r}")
    print(token)
    print("Store it now: it is not shown again (only its hash is kept).")
    return 0


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S%z")


def _table(keys: list[ApiKey]) -> str:
    header = ("ID", "NAME", "TENANT", "MODELS", "COLLECTIONS", "RPM", "TPM", "CREATED", "REVOKED")
    rows = [
        (
            key.id,
            key.name or "-",
            repr(key.tenant) if not key.tenant else key.tenant,
            ",".join(key.models) or "*",
            ",".join(key.collections) or "*",
            "-" if key.rpm_limit is None else str(key.rpm_limit),
            "-" if key.tpm_limit is None else str(key.tpm_limit),
            _when(key.created_at),
            _when(key.revoked_at),
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
