"""Password checking through twisted.cred over the users table of a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from esp.addresses import parse_address
from esp.auth import (
    AuthenticationBusy,
    DirectoryChecker,
    PasswordHasher,
    WeakPassword,
    check_new_password,
)
from esp.config import Argon2Config
from esp.storage import directory as d
from esp.storage.db import Database, run_sync

FAST = Argon2Config(time_cost=1, memory_cost_kib=8192, parallelism=1)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-hashing")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def db(database_dsn: str) -> Iterator[Database]:
    database = Database(database_dsn, reactor)
    database.open()
    yield database
    database.close()


@pytest.fixture
def users(database_dsn: str, tmp_path: Path) -> PasswordHasher:
    hasher = PasswordHasher(FAST)
    conn = psycopg2.connect(database_dsn)
    run_sync(conn, d.add_domain_txn, "example.test")
    for name in ("alice", "dora"):
        run_sync(
            conn, d.add_user_txn, parse_address(f"{name}@example.test"),
            hasher.hash("correct horse"), tmp_path,
        )
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET enabled = false WHERE localpart = 'dora'")
    conn.close()
    return hasher


def checker_for(db: Database, tmp_path: Path, pool: ThreadPool, settings: Argon2Config = FAST) -> DirectoryChecker:
    return DirectoryChecker(d.DirectoryStore(db, tmp_path), PasswordHasher(settings), reactor, pool)


def test_hashes_are_argon2id_and_verify() -> None:
    hasher = PasswordHasher(FAST)
    encoded = hasher.hash("correct horse")
    assert encoded.startswith("$argon2id$")
    assert hasher.verify(encoded, "correct horse")
    assert not hasher.verify(encoded, "wrong horse")
    assert not hasher.verify("not-a-hash", "correct horse")


@pytest.mark.parametrize("bad", ["short", "x" * 1025, "tab\tinside"])
def test_weak_new_passwords_are_refused(bad: str) -> None:
    with pytest.raises(WeakPassword):
        check_new_password(bad)


@pytest_twisted.ensureDeferred
async def test_right_password_gives_the_address(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool
) -> None:
    checker = checker_for(db, tmp_path, threadpool)
    verifyObject(ICredentialsChecker, checker)
    avatar = await checker.requestAvatarId(UsernamePassword(b"Alice@Example.TEST", b"correct horse"))
    assert avatar == b"alice@example.test"
    user = await d.DirectoryStore(db, tmp_path).find_user(parse_address("alice@example.test"))
    assert user is not None


@pytest.mark.parametrize(
    "username, password",
    [
        (b"alice@example.test", b"wrong horse"),
        (b"nobody@example.test", b"correct horse"),
        (b"dora@example.test", b"correct horse"),  # disabled
        (b"not an address", b"correct horse"),
        (b"\xff\xfe@example.test", b"correct horse"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_unknown_disabled_and_garbage_all_fail_alike(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool,
    username: bytes, password: bytes,
) -> None:
    checker = checker_for(db, tmp_path, threadpool)
    with pytest.raises(UnauthorizedLogin, match="bad user name or password"):
        await checker.requestAvatarId(UsernamePassword(username, password))


@pytest_twisted.ensureDeferred
async def test_unknown_users_cost_the_same_hashing_work(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checker = checker_for(db, tmp_path, threadpool)
    verified: list[str] = []
    real_verify = PasswordHasher.verify

    def counting_verify(self: PasswordHasher, encoded: str, password: str) -> bool:
        verified.append(encoded[:10])
        return real_verify(self, encoded, password)

    monkeypatch.setattr(PasswordHasher, "verify", counting_verify)
    for name in (b"alice@example.test", b"nobody@example.test", b"dora@example.test",
                 b"not an address"):
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(name, b"wrong horse"))
    # One argon2id verification each, whether or not the account exists or may log in.
    assert verified == ["$argon2id$"] * 4


@pytest_twisted.ensureDeferred
async def test_a_flood_of_logins_fails_fast_instead_of_queueing(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool
) -> None:
    checker = DirectoryChecker(
        d.DirectoryStore(db, tmp_path), PasswordHasher(FAST), reactor, threadpool, max_pending=2
    )
    attempts = [
        checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"correct horse"))
        for _ in range(3)
    ]
    with pytest.raises(AuthenticationBusy):
        await attempts[2]
    assert await attempts[0] == b"alice@example.test"
    assert await attempts[1] == b"alice@example.test"
    # Capacity comes back once the checks in progress are done.
    assert await checker.requestAvatarId(
        UsernamePassword(b"alice@example.test", b"correct horse")
    ) == b"alice@example.test"


@pytest_twisted.ensureDeferred
async def test_login_rehashes_when_the_parameters_change(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool, database_dsn: str
) -> None:
    stronger = Argon2Config(time_cost=2, memory_cost_kib=8192, parallelism=1)
    checker = checker_for(db, tmp_path, threadpool, stronger)
    await checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"correct horse"))
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT password_hash, last_login_at FROM users WHERE localpart = 'alice'")
        encoded, last_login = cur.fetchone()
    assert ",t=2," in encoded
    assert last_login is not None
    assert PasswordHasher(stronger).verify(encoded, "correct horse")


@implementer(IRealm)
class EchoRealm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return interfaces[0], avatarId, lambda: None


@pytest_twisted.ensureDeferred
async def test_a_cred_portal_logs_in_through_the_checker(
    db: Database, users: PasswordHasher, tmp_path: Path, threadpool: ThreadPool
) -> None:
    portal = Portal(EchoRealm(), [checker_for(db, tmp_path, threadpool)])
    interface, avatar, _logout = await portal.login(
        UsernamePassword(b"alice@example.test", b"correct horse"), None, Interface
    )
    assert avatar == b"alice@example.test"
    with pytest.raises(UnauthorizedLogin):
        await portal.login(UsernamePassword(b"alice@example.test", b"nope"), None, Interface)
