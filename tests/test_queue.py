"""The outbound queue as delivery workers use it, on a real PostgreSQL: claims that never
overlap between workers, leases that a dead worker loses, retries on the backoff schedule, and
the end states of a row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from esp.events import MESSAGE_SENT, Event, event_record
from esp.storage.db import connect, run_sync
from esp.storage.queue import (
    DEFAULT_RETRY_SCHEDULE,
    Claim,
    LeaseLost,
    RecipientOutcome,
    backoff_seconds,
    claim_due_txn,
    enqueue_txn,
    finish_many_txn,
    finish_txn,
)


@pytest.fixture
def db(database_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(database_dsn)
    yield conn
    conn.close()


def enqueue(db: psycopg2.extensions.connection, name: str, *recipients: str) -> list[int]:
    return run_sync(db, enqueue_txn, name, "alice@example.test", list(recipients), 100)


def claim(db: psycopg2.extensions.connection, owner: str, lease: int = 600,
          limit: int = 10) -> list[Claim]:
    return run_sync(db, claim_due_txn, owner, lease, limit)


def row(db: psycopg2.extensions.connection, queue_id: int) -> tuple[str, int, float]:
    with db.cursor() as cur:
        cur.execute("SELECT status, attempts, extract(epoch FROM next_attempt_at - now()) "
                    "FROM queue WHERE id = %s", (queue_id,))
        found = cur.fetchone()
    db.commit()
    assert found is not None
    return found[0], found[1], float(found[2])


def test_one_row_per_domain_and_claims_never_overlap(database_dsn: str, db: Any) -> None:
    ids = enqueue(db, "m1", "a@one.test", "b@one.test", "c@two.test")
    assert len(ids) == 2
    first = connect(database_dsn)
    second = connect(database_dsn)
    try:
        with first.cursor() as cur1, second.cursor() as cur2:
            mine = claim_due_txn(cur1, "worker-1", 600, 1)  # still uncommitted: rows locked
            theirs = claim_due_txn(cur2, "worker-2", 600, 10)
        first.commit()
        second.commit()
    finally:
        first.close()
        second.close()
    assert len(mine) == 1 and len(theirs) == 1
    assert {mine[0].queue_id, theirs[0].queue_id} == set(ids)
    by_domain = {c.recipient_domain: c for c in mine + theirs}
    assert by_domain["one.test"].recipients == ("a@one.test", "b@one.test")
    assert by_domain["two.test"].recipients == ("c@two.test",)
    assert all(c.attempts == 1 and not c.expired and c.spool_name == "m1"
               for c in mine + theirs)
    assert claim(db, "worker-3") == []  # leased: nothing due


def test_a_dead_workers_lease_runs_out_and_it_cannot_finish_afterwards(db: Any) -> None:
    [queue_id] = enqueue(db, "m2", "a@one.test")
    [lost] = claim(db, "dead-worker", lease=0)  # expires at once
    [taken] = claim(db, "live-worker")
    assert taken.queue_id == queue_id and taken.attempts == 2
    with pytest.raises(LeaseLost):
        run_sync(db, finish_txn, lost, "dead-worker", {"a@one.test": RecipientOutcome("sent")})
    finished = run_sync(db, finish_txn, taken, "live-worker",
                        {"a@one.test": RecipientOutcome("sent", 250, "ok")})
    assert finished.status == "sent" and finished.message_done
    assert row(db, queue_id)[0] == "sent"
    assert claim(db, "anyone") == []


def outbox_ids(db: psycopg2.extensions.connection) -> list[str]:
    with db.cursor() as cur:
        cur.execute("SELECT id::text FROM event_outbox ORDER BY id")
        found = [i for (i,) in cur.fetchall()]
    db.commit()
    return found


def test_an_outcomes_events_are_written_only_with_the_outcome(db: Any) -> None:
    [queue_id] = enqueue(db, "m9", "a@one.test")
    [lost] = claim(db, "dead-worker", lease=0)
    [taken] = claim(db, "live-worker")
    outcome = {"a@one.test": RecipientOutcome("sent", 250, "ok")}
    late, on_time = (event_record(Event(MESSAGE_SENT, {"queue_id": queue_id}))
                     for _ in range(2))
    [result] = run_sync(db, finish_many_txn, "dead-worker", [(lost, outcome, None, [late])])
    assert isinstance(result, LeaseLost)
    assert outbox_ids(db) == []  # the outcome was not recorded: neither is its event
    run_sync(db, finish_many_txn, "live-worker", [(taken, outcome, None, [on_time])])
    assert outbox_ids(db) == [on_time["id"]]


def test_deferred_recipients_are_retried_on_the_backoff_schedule(db: Any) -> None:
    [queue_id] = enqueue(db, "m3", "a@one.test", "b@one.test")
    [first] = claim(db, "w")
    finished = run_sync(db, finish_txn, first, "w", {
        "a@one.test": RecipientOutcome("sent", 250),
        "b@one.test": RecipientOutcome("deferred", 451, "4.7.1 greylisted"),
    })
    assert finished.status == "queued" and not finished.message_done
    state, attempts, wait = row(db, queue_id)
    assert (state, attempts) == ("queued", 1)
    assert backoff_seconds(1) - 5 < wait <= backoff_seconds(1)
    assert claim(db, "w") == []  # not due yet
    with db.cursor() as cur:
        cur.execute("UPDATE queue SET next_attempt_at = now() WHERE id = %s", (queue_id,))
    db.commit()
    [second] = claim(db, "w")
    assert second.recipients == ("b@one.test",) and second.attempts == 2
    assert [backoff_seconds(n) for n in (1, 2, 3, 4, 5, 6, 30)] == [
        60, 300, 900, 3600, 7200, 7200, 7200]
    assert DEFAULT_RETRY_SCHEDULE[-1] == 7200
    assert backoff_seconds(3, (10, 20)) == 20


def test_an_expired_message_bounces_what_is_left(db: Any) -> None:
    [queue_id] = enqueue(db, "m4", "a@one.test", "b@one.test")
    with db.cursor() as cur:
        cur.execute("UPDATE queue SET created_at = now() - interval '5 days 1 second' "
                    "WHERE id = %s", (queue_id,))
    db.commit()
    [expired] = claim(db, "w")
    assert expired.expired
    finished = run_sync(db, finish_txn, expired, "w", {
        "a@one.test": RecipientOutcome("sent", 250),
        "b@one.test": RecipientOutcome("deferred", 421, "4.4.2 timeout"),
    })
    assert finished.status == "bounced" and finished.message_done
    with db.cursor() as cur:
        cur.execute("SELECT address, status FROM queue_recipients WHERE queue_id = %s "
                    "ORDER BY address", (queue_id,))
        assert cur.fetchall() == [("a@one.test", "sent"), ("b@one.test", "bounced")]
    db.commit()


def test_one_domains_backlog_does_not_crowd_out_the_others(db: Any) -> None:
    for n in range(30):
        enqueue(db, f"busy{n}", f"u{n}@busy.test")
    enqueue(db, "quiet1", "a@quiet.test")
    enqueue(db, "quiet2", "b@quiet.test")
    claims = run_sync(db, claim_due_txn, "w", 600, 10, None, 3600, (), 4)
    domains = sorted(c.recipient_domain for c in claims)
    assert domains == ["busy.test"] * 4 + ["quiet.test"] * 2


def test_a_worker_does_not_reclaim_rows_it_still_holds(db: Any) -> None:
    [queue_id] = enqueue(db, "m5", "a@one.test")
    [held] = claim(db, "w", lease=0)  # its lease lapsed (the database was away)
    assert run_sync(db, claim_due_txn, "w", 600, 10, None, 3600, [held.queue_id]) == []
    [again] = claim(db, "w")
    assert again.queue_id == queue_id and again.attempts == 2
