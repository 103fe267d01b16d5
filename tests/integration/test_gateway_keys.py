"""The gateway's key store on a real PostgreSQL: only digests stored, authentication of good,
wrong and revoked keys (across the cache), allowances, the development key's `ensure`, a
database outage as KeyStoreUnavailable, and `daert keys create | list | revoke`."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

import psycopg
import pytest
from daert.cli import keys as keys_cli
from daert.gateway.keys import KeyStore, KeyStoreUnavailable
from daert.local.postgres import EmbeddedPostgres

from tests.helpers import free_port

TOKEN = re.compile(r"^dk-[0-9a-f]{12}-[A-Za-z0-9_-]{43}$")


@pytest.fixture
async def store(postgres: EmbeddedPostgres) -> AsyncIterator[KeyStore]:
    store = KeyStore(postgres.dsn, cache_ttl_s=0)
    await store.open()
    yield store
    await store.close()


async def test_only_the_digest_is_stored(store: KeyStore, postgres: EmbeddedPostgres) -> None:
    token, key = await store.create(tenant="acme", name="digest")
    assert TOKEN.match(token)
    assert token.startswith(f"dk-{key.id}-")
    secret = token.removeprefix(f"dk-{key.id}-")
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as conn:
        cursor = await conn.execute(
            "SELECT k::text, token_sha256 FROM daert_gateway_api_keys k WHERE id = %s", (key.id,)
        )
        row = await cursor.fetchone()
    assert row is not None
    whole_row, digest = row
    assert secret not in whole_row and token not in whole_row
    assert bytes(digest) == hashlib.sha256(token.encode()).digest()


async def test_authenticates_the_right_token_only(store: KeyStore) -> None:
    token, key = await store.create(
        tenant="acme", name="app", models=["m1", "m2"], rpm_limit=5, tpm_limit=100
    )
    found = await store.authenticate(token)
    assert found == key
    assert (found.tenant, found.models, found.rpm_limit, found.tpm_limit) == (
        "acme",
        ("m1", "m2"),
        5,
        100,
    )
    assert found.created_at.tzinfo is not None and found.revoked_at is None
    assert await store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await store.authenticate(f"dk-{key.id}-wrong") is None
    assert await store.authenticate("sk-not-ours") is None
    assert await store.authenticate("") is None


async def test_allowances(store: KeyStore) -> None:
    token, _ = await store.create(tenant="acme", models=["m1", " m1 "], collections=["docs"])
    stored = await store.authenticate(token)
    assert stored is not None and stored.models == ("m1",) and stored.collections == ("docs",)
    assert stored.allows_model("m1") and not stored.allows_model("m2")
    assert stored.allows_collection("docs") and not stored.allows_collection("other")
    _, everything = await store.create(tenant="acme")
    assert everything.allows_model("any") and everything.allows_collection("any")
    with pytest.raises(ValueError, match="empty model"):
        await store.create(tenant="acme", models=[""])
    with pytest.raises(ValueError, match="rpm_limit"):
        await store.create(tenant="acme", rpm_limit=0)


async def test_revoked_keys_fail_here_at_once_and_elsewhere_after_the_cache_ttl(
    postgres: EmbeddedPostgres,
) -> None:
    """Three replicas: one revokes; one caches for long (still trusts the key: the documented
    delay), one for a moment (refuses it once its entry has expired)."""
    stores = [KeyStore(postgres.dsn, cache_ttl_s=ttl, pool_max_size=1) for ttl in (60.0, 60.0, 0.2)]
    revoking, long_cache, short_cache = stores
    for store in stores:
        await store.open()
    try:
        token, key = await revoking.create(tenant="acme", name="revoked")
        for store in stores:
            assert await store.authenticate(token) == key
        assert await revoking.revoke(key.id) is True
        assert await revoking.authenticate(token) is None  # its own cache forgot it
        assert await long_cache.authenticate(token) == key
        await asyncio.sleep(0.3)
        assert await short_cache.authenticate(token) is None
        assert await revoking.revoke(key.id) is False  # already revoked
        assert await revoking.revoke("no-such-key") is False
        listed = {k.id: k for k in await revoking.list(include_revoked=True)}
        assert listed[key.id].revoked_at is not None
        assert key.id not in {k.id for k in await revoking.list()}
    finally:
        for store in stores:
            await store.close()


async def test_ensure_registers_a_given_token_idempotently(store: KeyStore) -> None:
    token = "dk-dev-" + "x" * 40
    first = await store.ensure(token, tenant="", name="dev key")
    again = await store.ensure(token, tenant="", name="dev key", rpm_limit=10)
    assert again.id == first.id and again.created_at == first.created_at
    assert again.rpm_limit == 10
    assert await store.authenticate(token) == again
    assert [k.id for k in await store.list()].count(first.id) == 1
    # A revoked key is not brought back by the next `daert up`.
    assert await store.revoke(first.id)
    assert (await store.ensure(token, tenant="", name="dev key")).revoked_at is not None
    assert await store.authenticate(token) is None
    with pytest.raises(ValueError, match="starts with"):
        await store.ensure("sk-" + "x" * 40, tenant="")
    with pytest.raises(ValueError, match="32 characters"):
        await store.ensure("dk-short", tenant="")


async def test_database_outage_is_key_store_unavailable() -> None:
    store = KeyStore(
        f"postgresql://daert@127.0.0.1:{free_port()}/daert", connect_timeout_s=1, pool_max_size=1
    )
    await store.open()  # the gateway starts anyway, and answers 503 meanwhile
    try:
        with pytest.raises(KeyStoreUnavailable):
            await store.authenticate("dk-0123456789ab-" + "x" * 43)
        assert await store.ping() is False
    finally:
        await store.close()
    with pytest.raises(KeyStoreUnavailable):
        await KeyStore(f"postgresql://127.0.0.1:{free_port()}/x").open(require_database=True)


async def test_a_key_seen_recently_survives_a_database_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("keys-outage"))
    dsn = server.start()
    tolerant = KeyStore(dsn, cache_ttl_s=0.05, connect_timeout_s=1)
    strict = KeyStore(dsn, cache_ttl_s=0.05, connect_timeout_s=1, stale_grace_s=0)
    await tolerant.open()
    await strict.open()
    try:
        token, key = await tolerant.create(tenant="acme")
        assert await strict.authenticate(token) == key
        assert await tolerant.authenticate(token) == key
        await asyncio.sleep(0.1)  # both cache entries expire
        server.stop()
        assert await tolerant.authenticate(token) == key
        with pytest.raises(KeyStoreUnavailable):
            await strict.authenticate(token)
        with pytest.raises(KeyStoreUnavailable):  # a key never seen is not guessed at
            await tolerant.authenticate("dk-0123456789ab-" + "x" * 43)
        server.start()
        assert await strict.authenticate(token) == key  # the pool reconnects by itself
    finally:
        await tolerant.close()
        await strict.close()
        server.stop()


# --- the CLI -----------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="daert")
    keys_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return keys_cli.run(parser.parse_args(argv))


def test_cli_create_list_revoke(
    postgres: EmbeddedPostgres,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DAERT_GATEWAY_DSN", postgres.dsn)
    args = ["--tenant", "cli-tenant", "--name", "ci", "--model", "m1", "--model", "m2"]
    assert _cli("keys", "create", *args, "--collection", "docs", "wiki", "--rpm", "30") == 0
    created = capsys.readouterr().out
    tokens = [line for line in created.splitlines() if line.startswith("dk-")]
    assert len(tokens) == 1 and TOKEN.match(tokens[0])
    token = tokens[0]
    assert "store it now" in created.lower()
    key_id = token.split("-")[1]

    assert _cli("keys", "list") == 0
    listing = capsys.readouterr().out
    header, *rows = listing.splitlines()
    assert header.split() == [
        "ID", "NAME", "TENANT", "MODELS", "COLLECTIONS", "RPM", "TPM", "CREATED", "REVOKED",
    ]  # fmt: skip
    row = next(line for line in rows if line.startswith(key_id))
    assert row.split()[:7] == [key_id, "ci", "cli-tenant", "m1,m2", "docs,wiki", "30", "-"]
    assert row.split()[-1] == "-"
    assert token.split("-", 2)[2] not in listing

    assert _cli("keys", "revoke", key_id) == 0
    assert key_id in capsys.readouterr().out
    assert _cli("keys", "list") == 0
    assert key_id not in capsys.readouterr().out
    assert _cli("keys", "list", "--all") == 0
    revoked = next(line for line in capsys.readouterr().out.splitlines() if key_id in line)
    assert revoked.split()[-1] != "-"
    assert _cli("keys", "revoke", key_id) == 1
    assert "no active key" in capsys.readouterr().err


def test_cli_errors_without_tracebacks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DAERT_GATEWAY_DSN", raising=False)
    assert _cli("keys", "list") == 2
    assert "DAERT_GATEWAY_DSN" in capsys.readouterr().err
    monkeypatch.setenv("DAERT_GATEWAY_DSN", f"postgresql://127.0.0.1:{free_port()}/daert")
    assert _cli("keys", "create", "--tenant", "t") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unavailable" in err and "Traceback" not in err
    monkeypatch.setenv("DAERT_GATEWAY_DSN", "not a dsn")
    assert _cli("keys", "list") == 2
    assert capsys.readouterr().err.startswith("error:")
