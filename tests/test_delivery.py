"""Local delivery with group commit, against a real PostgreSQL and real Maildirs: concurrent
messages share flushes, yet each is stored once, gets its own UID and fails on its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.threadpool import ThreadPool

from esp.addresses import parse_address
from esp.delivery import (
    DeliveryFailed,
    DeliveryResult,
    LocalDelivery,
    LocalRecipient,
    MailboxFull,
)
from esp.events import EventBus
from esp.message import summarize
from esp.storage import directory
from esp.storage.db import Database, connect, run_sync
from esp.storage.mailstore import NewMessage, record_fields
from esp.storage.recorder import CONNECT_TIMEOUT, Recorder, _connect_timeout
from tests.helpers import until


@dataclass
class Setup:
    delivery: LocalDelivery
    maildir_root: Path
    dsn: str
    users: dict[str, LocalRecipient]

    def rows(self, address: str, mailbox: str = "INBOX") -> list[tuple[int, str, int]]:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT m.uid, m.filename, m.size FROM messages m JOIN mailboxes b "
                "ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id "
                "WHERE u.localpart || '@example.test' = %s AND b.name = %s ORDER BY m.uid",
                (address, mailbox),
            )
            return list(cur.fetchall())

    def transactions(self, address: str) -> int:
        """How many transactions recorded the user's messages (now() is the same for every
        statement of one transaction)."""
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(DISTINCT m.created_at) FROM messages m JOIN mailboxes b "
                "ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id "
                "WHERE u.localpart || '@example.test' = %s", (address,),
            )
            row = cur.fetchone()
            assert row is not None
            return int(row[0])

    def recorder_waiting(self) -> bool:
        """Whether the writer's connection has run its statement and waits to commit."""
        return self._recorder_is("state = 'idle in transaction'")

    def recorder_blocked(self) -> bool:
        """Whether the writer's statement waits for a lock."""
        return self._recorder_is("wait_event_type = 'Lock'")

    def _recorder_is(self, condition: str) -> bool:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                        f"'esp-delivery' AND {condition}")
            row = cur.fetchone()
            return bool(row and row[0])

    def usage(self, address: str) -> tuple[int, int]:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT used_bytes, used_messages FROM users "
                        "WHERE localpart || '@example.test' = %s", (address,))
            row = cur.fetchone()
            assert row is not None
            return row[0], row[1]

    def files(self, address: str, folder: str = "") -> list[str]:
        new = self.maildir_root / self.users[address].maildir / folder / "new"
        return sorted(p.name for p in new.iterdir()) if new.exists() else []


@pytest.fixture
def disk_pool() -> Iterator[ThreadPool]:
    pool = ThreadPool(1, 2, "test-disk")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.async_yield_fixture
async def setup(database_dsn: str, scratch: Path, disk_pool: ThreadPool) -> AsyncIterator[Setup]:
    root = scratch / "maildir"
    conn = connect(database_dsn)
    run_sync(conn, directory.add_domain_txn, "example.test")
    users = {}
    for name, quota in (("alice", None), ("bob", 10), ("carol", None)):
        user = run_sync(conn, directory.add_user_txn, parse_address(f"{name}@example.test"),
                        "x", root, quota_bytes=quota)
        users[user.address] = LocalRecipient(user.id, user.address, user.maildir)
    conn.close()
    db = Database(database_dsn, reactor)
    db.open()
    delivery = LocalDelivery(
        db, root, scratch / "spool", disk_pool, EventBus(), reactor, database_dsn
    )
    delivery.prepare()
    yield Setup(delivery, root, database_dsn, users)
    await delivery.close()
    db.close()


def deliver(setup: Setup, *args: Any, **kwargs: Any) -> Deferred[DeliveryResult]:
    return Deferred.fromCoroutine(setup.delivery.deliver(*args, **kwargs))


def message(n: int) -> bytes:
    return (f"From: a@client.test\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}@client.test>\r\n\r\nbody {n}\r\n").encode()


@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_share_commits_and_each_is_stored_once(
    setup: Setup,
) -> None:
    alice = setup.users["alice@example.test"]
    # Hold alice's INBOX row so that the first statement waits while the others arrive.
    locker = psycopg2.connect(setup.dsn)
    with locker.cursor() as cur:
        cur.execute("SELECT 1 FROM mailboxes WHERE user_id = %s AND name = 'INBOX' FOR UPDATE",
                    (alice.user_id,))
    pending = [deliver(setup, message(n), "a@client.test", [alice]) for n in range(12)]
    # Every message is sent to the writer at once; the first group waits for the lock, the
    # others wait there for the next one.
    await until(lambda: setup.delivery._deliveries.pending == 0)
    await until(setup.recorder_blocked)
    assert not any(d.called for d in pending)  # nothing acknowledged before its commit
    locker.commit()
    locker.close()
    results = await DeferredList(pending, fireOnOneErrback=True)
    uids = sorted(result.stored[0].uid for _, result in results)
    assert uids == list(range(1, 13))
    rows = setup.rows("alice@example.test")
    assert [uid for uid, _, _ in rows] == uids
    assert sorted(name for _, name, _ in rows) == setup.files("alice@example.test")
    for _uid, name, size in rows:
        body = (setup.maildir_root / alice.maildir / "new" / name).read_bytes()
        assert len(body) == size
        assert body == message(int(body.rsplit(b" ", 1)[1]))
    assert setup.usage("alice@example.test") == (sum(size for *_, size in rows), 12)
    # The first group waited for the lock; all that arrived meanwhile (if any) shared the
    # next commit.
    assert setup.transactions("alice@example.test") <= 2


@pytest_twisted.ensureDeferred
async def test_a_failing_message_fails_alone_and_leaves_nothing_behind(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    bob = setup.users["bob@example.test"]
    carol = setup.users["carol@example.test"]
    gone = replace(alice, folder=".Gone", mailbox="Gone")  # no such mailbox in the index
    first = deliver(setup, message(0), "a@client.test", [alice])
    batch = [
        deliver(setup, message(1), "a@client.test", [alice]),
        deliver(setup, message(2), "a@client.test", [gone]),
        deliver(setup, message(3), "a@client.test", [bob], enforce_quota=True),
        deliver(setup, message(4), "a@client.test", [carol, alice]),
        # All or nothing: carol would fit, bob would not.
        deliver(setup, message(5), "a@client.test", [carol, bob], enforce_quota=True),
    ]
    await first
    outcomes = await DeferredList(batch, consumeErrors=True)
    assert outcomes[0][0] and outcomes[3][0]
    assert not outcomes[1][0] and outcomes[1][1].check(DeliveryFailed)
    assert not outcomes[2][0] and outcomes[2][1].check(MailboxFull)
    assert not outcomes[4][0] and outcomes[4][1].check(MailboxFull)
    assert [uid for uid, _, _ in setup.rows("alice@example.test")] == [1, 2, 3]
    assert [uid for uid, _, _ in setup.rows("carol@example.test")] == [1]
    assert setup.rows("bob@example.test") == []
    assert setup.usage("bob@example.test") == (0, 0)
    assert len(setup.files("carol@example.test")) == 1
    assert setup.files("bob@example.test") == []
    assert setup.files("alice@example.test", ".Gone") == []
    assert len(setup.files("alice@example.test")) == 3


def fields(jobs: list[list[NewMessage]]) -> list[list[dict[str, object]]]:
    return [[record_fields(m) for m in job] for job in jobs]


def record(recipient: LocalRecipient, n: int, size: int = 100, **kw: Any) -> NewMessage:
    return NewMessage(
        mailbox_id=None, mailbox=kw.pop("mailbox", "INBOX"), user_id=recipient.user_id,
        filename=f"f{n}", size=size, internal_date=_now(), envelope_from="a@client.test",
        envelope_to=(recipient.address,), summary=summarize(message(n)), **kw,
    )


def test_one_statement_stores_a_batch_and_each_job_is_all_or_nothing(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    bob = setup.users["bob@example.test"]
    carol = setup.users["carol@example.test"]
    recorder = Recorder(setup.dsn)
    outcomes = recorder.record(fields([
        [record(alice, 1)],
        [record(alice, 2, mailbox="Gone")],
        [record(bob, 3, enforce_quota=True)],  # bob's quota is 10 bytes
        [record(carol, 4), record(alice, 4)],
        [record(carol, 5), record(bob, 5, enforce_quota=True)],
        [record(bob, 6, size=5, enforce_quota=True)],
    ]))
    recorder.close()
    assert [status for status, _ in outcomes] == [
        "stored", "no_mailbox", "over_quota", "stored", "over_quota", "stored"
    ]
    assert [len(value) for status, value in outcomes if status == "stored"] == [1, 2, 1]
    assert [(uid, name) for uid, name, _ in setup.rows("alice@example.test")] == [
        (1, "f1"), (2, "f4")
    ]
    assert [name for _, name, _ in setup.rows("carol@example.test")] == ["f4"]
    assert [name for _, name, _ in setup.rows("bob@example.test")] == ["f6"]
    assert setup.usage("bob@example.test") == (5, 1)
    assert setup.usage("carol@example.test") == (100, 1)
    assert setup.transactions("alice@example.test") == 1


def test_a_whole_batch_that_fits_is_stored_in_order(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    carol = setup.users["carol@example.test"]
    recorder = Recorder(setup.dsn)
    outcomes = recorder.record(fields([
        [record(alice, 1)], [record(carol, 2), record(alice, 2)], [record(alice, 3, seen=True)],
    ]))
    recorder.close()
    assert outcomes[0] == ("stored", ((outcomes[0][1][0][0], 1, 2),))
    assert [uid for _, uid, _ in outcomes[1][1]] == [1, 2]
    assert [uid for _, uid, _ in outcomes[2][1]] == [3]
    assert [name for _, name, _ in setup.rows("alice@example.test")] == ["f1", "f2", "f3"]
    with psycopg2.connect(setup.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT uidnext, highestmodseq, message_count, unseen_count, total_bytes "
                    "FROM mailboxes WHERE id = %s", (outcomes[0][1][0][0],))
        assert cur.fetchone() == (4, 4, 3, 2, 300)


def test_a_job_the_database_refuses_does_not_take_its_batch_with_it(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    # A negative size breaks a CHECK constraint: the whole statement fails, then each job is
    # tried on its own.
    recorder = Recorder(setup.dsn)
    outcomes = recorder.record(
        fields([[record(alice, 1)], [record(alice, 2, -1)], [record(alice, 3)]])
    )
    recorder.close()
    assert outcomes[1][0] == "failed" and "check" in outcomes[1][1].lower()
    assert [uid for _, uid, _ in outcomes[0][1]] == [1]
    assert [uid for _, uid, _ in outcomes[2][1]] == [2]
    assert [(uid, name) for uid, name, _ in setup.rows("alice@example.test")] == [
        (1, "f1"), (2, "f3")
    ]


def test_rows_become_visible_only_once_their_files_are_durable(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    recorder = Recorder(setup.dsn)
    jobs = fields([[record(alice, 1)], [record(alice, 2)]])
    recorder.begin(jobs)
    # The statement runs while the files are being synced, and its transaction stays open.
    deadline = time.monotonic() + 30
    while not setup.recorder_waiting():
        assert time.monotonic() < deadline, "the recorder never ran its statement"
        time.sleep(0.01)
    assert setup.rows("alice@example.test") == []
    outcomes = recorder.finish(jobs, [None, "cannot sync new/"])
    recorder.close()
    assert outcomes[0][0] == "stored"
    assert outcomes[1] == ("failed", "cannot sync new/")
    assert [(uid, name) for uid, name, _ in setup.rows("alice@example.test")] == [(1, "f1")]
    assert setup.usage("alice@example.test") == (100, 1)


def test_a_connection_lost_between_groups_is_replaced_not_failed(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    recorder = Recorder(setup.dsn)
    assert recorder.record(fields([[record(alice, 1)]]))[0][0] == "stored"
    # PostgreSQL restarted, or a proxy dropped the idle connection, between two groups.
    with psycopg2.connect(setup.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'esp-delivery'")
        assert cur.fetchall() == [(True,)]
    assert recorder.record(fields([[record(alice, 2)]]))[0][0] == "stored"
    recorder.close()
    assert [(uid, name) for uid, name, _ in setup.rows("alice@example.test")] == [
        (1, "f1"), (2, "f2")
    ]


def test_a_statement_stuck_behind_a_lock_fails_its_group_at_the_deadline(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    recorder = Recorder(setup.dsn, deadline=1)
    with psycopg2.connect(setup.dsn) as holder, holder.cursor() as cur:
        # Another transaction holds alice's inbox row (an admin's long transaction, say).
        cur.execute("SELECT 1 FROM mailboxes WHERE user_id = %s FOR UPDATE", (alice.user_id,))
        outcome = recorder.record(fields([[record(alice, 1)]]))[0]
        # The server cancelled the statement: no backend is left waiting with the group's
        # locks while the holder keeps its own.
        assert not setup.recorder_blocked()
    assert outcome[0] == "failed" and "statement timeout" in outcome[1]
    # Given up means not committed, even once the lock is free; the next group goes through.
    assert recorder.record(fields([[record(alice, 2)]]))[0][0] == "stored"
    recorder.close()
    assert [name for _, name, _ in setup.rows("alice@example.test")] == ["f2"]


def test_the_connect_timeout_is_libpqs_but_never_unbounded() -> None:
    assert _connect_timeout("dbname=esp connect_timeout=30") == 30
    assert _connect_timeout("dbname=esp connect_timeout=1") == 2  # libpq's floor
    assert _connect_timeout("dbname=esp connect_timeout=0") == CONNECT_TIMEOUT  # not for ever
    assert _connect_timeout("postgresql:///esp") == CONNECT_TIMEOUT


def test_events_the_database_refuses_fail_only_their_own_job(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    good = {"id": str(uuid.uuid4()), "type": "message.received",
            "occurred_at": _now().isoformat(), "domain": "example.test", "actor": None,
            "node": "n1", "payload": {"message_id": "<a\x00b@client.test>"}}
    bad = {**good, "id": "not-a-uuid"}  # refused by PostgreSQL
    unwritable = {**good, "id": str(uuid.uuid4()), "domain": "a\x00b"}  # refused by psycopg2
    recorder = Recorder(setup.dsn)
    outcomes = recorder.record(fields([
        [record(alice, 1, event=good)], [record(alice, 2, event=bad)], [record(alice, 3)],
        [record(alice, 4, event=unwritable)],
    ]))
    recorder.close()
    assert [status for status, _ in outcomes] == ["stored", "failed", "stored", "failed"]
    assert [name for _, name, _ in setup.rows("alice@example.test")] == ["f1", "f3"]
    with psycopg2.connect(setup.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, payload->>'message_id' FROM event_outbox")
        # PostgreSQL cannot store NUL: it is left out, not the event.
        assert cur.fetchall() == [(good["id"], "<ab@client.test>")]


def test_a_database_that_is_away_fails_the_batch_cleanly(setup: Setup) -> None:
    alice = setup.users["alice@example.test"]
    recorder = Recorder("host=/nonexistent dbname=esp connect_timeout=1")
    assert recorder.record(fields([[record(alice, 1)]]))[0][0] == "failed"


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
