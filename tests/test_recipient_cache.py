"""The recipient cache of the SMTP path: found users are remembered for a while, refusals never
are (a new user or alias works at once)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from esp.addresses import parse_address
from esp.storage import directory
from esp.storage.db import Database, connect, run_sync
from esp.storage.directory import DirectoryStore, UnknownRecipient
from esp.storage.pgasync import AsyncDatabase

ALICE = parse_address("alice@example.test")


@pytest_twisted.async_yield_fixture
async def stores(database_dsn: str) -> AsyncIterator[tuple[Database, AsyncDatabase]]:
    db = Database(database_dsn, reactor)
    db.open()
    fast = AsyncDatabase(database_dsn, reactor, size=1)
    yield db, fast
    fast.close()
    db.close()


def _add_alice(dsn: str, root: Path) -> None:
    conn = connect(dsn)
    run_sync(conn, directory.add_user_txn, ALICE, "x", root)
    conn.close()


def _remove_alice(dsn: str, root: Path) -> None:
    conn = connect(dsn)
    run_sync(conn, directory.remove_user_txn, ALICE)
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_found_user_is_remembered_for_the_configured_time(
    database_dsn: str, scratch: Path, stores: tuple[Database, AsyncDatabase]
) -> None:
    conn = connect(database_dsn)
    run_sync(conn, directory.add_domain_txn, "example.test")
    conn.close()
    root = scratch / "maildir"
    cached = DirectoryStore(stores[0], root, stores[1], cache_seconds=3600)
    uncached = DirectoryStore(stores[0], root, stores[1], cache_seconds=0)

    # A refusal is not remembered: the user works as soon as it exists.
    with pytest.raises(UnknownRecipient):
        await cached.resolve_recipient(ALICE)
    _add_alice(database_dsn, root)
    found = await cached.resolve_recipient(ALICE)
    assert [u.address for u in found.users] == ["alice@example.test"]
    assert await uncached.resolve_recipient(ALICE) == found

    # What this process stores is counted in the cached usage (for the quota check).
    cached.count_stored(found.users[0].id, 100)
    again = await cached.resolve_recipient(ALICE)
    assert (again.users[0].used_bytes, again.users[0].used_messages) == (
        found.users[0].used_bytes + 100, found.users[0].used_messages + 1
    )

    # Removed: the cache answers from memory until its time is up; without it, at once.
    _remove_alice(database_dsn, root)
    assert await cached.resolve_recipient(ALICE) == again
    with pytest.raises(UnknownRecipient):
        await uncached.resolve_recipient(ALICE)
