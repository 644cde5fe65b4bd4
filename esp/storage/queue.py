"""The outbound queue: a spooled body plus one row per message and recipient domain.

The body is durable in the spool before the rows are committed.  Delivery workers
(:mod:`esp.outbound`) lease rows with ``FOR UPDATE SKIP LOCKED``, so any number of workers and
nodes drain one queue without taking the same row twice; a worker renews its leases while it
delivers, and the rows of a worker that died fall due again when their leases run out.  An
attempt's outcome, the suppression of hard-bounced addresses and the queuing of the bounce
report to the sender are one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from esp.storage.db import Cursor
from esp.storage.outbox import insert_events_txn


def enqueue_txn(
    cur: Cursor,
    spool_name: str,
    sender: str,
    recipients: Sequence[str],
    size: int,
    user_id: int | None = None,
) -> list[int]:
    """Queue one message for remote recipients; return the queue ids (one per domain)."""
    by_domain: dict[str, list[str]] = {}
    for address in recipients:
        by_domain.setdefault(address.rpartition("@")[2].lower(), []).append(address)
    cur.execute(
        """
        INSERT INTO outbound_messages (spool_name, sender, size, user_id)
        VALUES (%s, %s, %s, %s) RETURNING id
        """,
        (spool_name, sender, size, user_id),
    )
    row = cur.fetchone()
    assert row is not None
    message_id = row[0]
    ids = []
    for domain, addresses in sorted(by_domain.items()):
        cur.execute(
            "INSERT INTO queue (message_id, recipient_domain) VALUES (%s, %s) RETURNING id",
            (message_id, domain),
        )
        row = cur.fetchone()
        assert row is not None
        queue_id = row[0]
        for address in dict.fromkeys(addresses):
            cur.execute(
                "INSERT INTO queue_recipients (queue_id, address) VALUES (%s, %s)",
                (queue_id, address),
            )
        ids.append(queue_id)
    return ids


# -- delivery workers: claims, leases, outcomes ------------------------------------------------

# Waits after the 1st, 2nd... failed attempt; the last one repeats until the message expires.
DEFAULT_RETRY_SCHEDULE = (60, 300, 900, 3600, 7200)
DEFAULT_MAX_QUEUE_TIME = 5 * 24 * 3600


def backoff_seconds(attempts: int, schedule: Sequence[int] = DEFAULT_RETRY_SCHEDULE) -> int:
    """Wait before attempt ``attempts + 1`` after ``attempts`` failed ones (at least 1)."""
    return int(schedule[min(max(attempts, 1), len(schedule)) - 1])


@dataclass(frozen=True)
class Claim:
    """One queue row leased to a worker: a message and its recipients in one domain."""

    queue_id: int
    message_id: int
    spool_name: str
    sender: str
    recipient_domain: str
    recipients: tuple[str, ...]
    attempts: int  # including this one
    expired: bool  # past the longest time in the queue: bounce what is still undelivered
    created_at: datetime | None = None
    user_id: int | None = None


def claim_due_txn(
    cur: Cursor,
    owner: str,
    lease_seconds: float,
    limit: int,
    now: datetime | None = None,
    max_queue_seconds: int = DEFAULT_MAX_QUEUE_TIME,
    exclude: Sequence[int] = (),
    per_domain: int = 1000,
    busy_domains: Sequence[str] = (),
) -> list[Claim]:
    """Lease up to ``limit`` rows to ``owner``: rows whose lease ran out (a worker that died)
    first, then rows due for an attempt at ``now`` (the database's clock by default), at
    most ``per_domain`` per recipient domain so that one domain's backlog does not keep the
    others waiting.  ``FOR UPDATE SKIP LOCKED``: any number of workers and nodes share the
    queue without ever taking the same row.  ``exclude``: rows the caller holds already;
    ``busy_domains``: domains it has enough of in hand."""
    _relaxed_commit(cur)
    cur.execute(
        """
        WITH clock AS (SELECT coalesce(%(now)s::timestamptz, now()) AS now),
        lapsed AS (
            SELECT q.id FROM queue q, clock
            WHERE q.status = 'delivering' AND q.lease_expires_at < clock.now
              AND q.id <> ALL(%(exclude)s::bigint[])
            ORDER BY q.lease_expires_at
            LIMIT %(limit)s
            FOR UPDATE OF q SKIP LOCKED
        ),
        candidates AS (
            SELECT q.id, q.recipient_domain, q.next_attempt_at FROM queue q, clock
            WHERE q.status = 'queued' AND q.next_attempt_at <= clock.now
              AND q.recipient_domain <> ALL(%(busy)s::text[])
            ORDER BY q.next_attempt_at
            LIMIT %(scan)s
        ),
        fair AS (
            SELECT id FROM (
                SELECT id, next_attempt_at, row_number() OVER (
                    PARTITION BY recipient_domain ORDER BY next_attempt_at) AS n
                FROM candidates
            ) c
            WHERE c.n <= %(per_domain)s
            ORDER BY c.next_attempt_at
            LIMIT %(limit)s
        ),
        due AS (
            SELECT q.id FROM queue q
            WHERE q.id IN (SELECT id FROM fair) AND q.status = 'queued'
            FOR UPDATE OF q SKIP LOCKED
        ),
        picked AS (SELECT id FROM lapsed UNION ALL SELECT id FROM due LIMIT %(limit)s)
        UPDATE queue AS q
        SET status = 'delivering', lease_owner = %(owner)s,
            lease_expires_at = clock.now + make_interval(secs => %(lease)s),
            attempts = q.attempts + 1, updated_at = now()
        FROM picked, clock, outbound_messages AS m
        WHERE q.id = picked.id AND m.id = q.message_id
        RETURNING q.id, q.message_id, m.spool_name, m.sender, q.recipient_domain, q.attempts,
                  q.created_at + make_interval(secs => %(max_age)s) <= clock.now,
                  m.created_at, m.user_id,
                  ARRAY(SELECT r.address FROM queue_recipients r
                        WHERE r.queue_id = q.id AND r.status IN ('queued', 'deferred')
                        ORDER BY r.address)
        """,
        {"now": now, "limit": limit, "owner": owner, "lease": lease_seconds,
         "max_age": max_queue_seconds, "exclude": list(exclude),
         "scan": max(5 * limit, 200), "per_domain": per_domain,
         "busy": list(busy_domains)},
    )
    return [
        Claim(queue_id, message_id, spool, sender, domain, tuple(recipients), attempts,
              expired, created, user_id)
        for (queue_id, message_id, spool, sender, domain, attempts, expired, created, user_id,
             recipients) in sorted(cur.fetchall())
    ]


def _relaxed_commit(cur: Cursor) -> None:
    """The delivery workers' bookkeeping commits without waiting for the WAL flush.

    Nothing acknowledged to anyone rests on these commits alone: if PostgreSQL itself crashes
    and loses the last few of them, the rows fall back to an earlier state (leased, with a
    lease that runs out) and are tried again.  The worst case is a message sent twice, the
    same as a worker dying between a remote's 250 and the commit (RFC 5321 §6.1 prefers a
    duplicate to a loss), and the same as Postfix, which does not fsync the removal of a
    delivered queue file.  A bounce report is queued in the same transaction as the bounce,
    so both are lost or kept together; its file is fsync'd before."""
    cur.execute("SET LOCAL synchronous_commit = off")


def sync_commits_txn(cur: Cursor) -> None:
    """A commit that waits for the WAL flush, and with it every earlier commit (the WAL is
    one stream): after it, the outcomes recorded without waiting are durable."""
    cur.execute("SET LOCAL synchronous_commit = on")
    cur.execute("SELECT txid_current()")  # a transaction id: the commit writes a record


def renew_leases_txn(
    cur: Cursor, owner: str, queue_ids: Sequence[int], lease_seconds: float,
    now: datetime | None = None,
) -> list[int]:
    """Push back the lease of rows ``owner`` still delivers; returns those it still holds."""
    _relaxed_commit(cur)
    cur.execute(
        "UPDATE queue SET lease_expires_at = coalesce(%s::timestamptz, now()) "
        "+ make_interval(secs => %s) "
        "WHERE id IN (SELECT id FROM queue WHERE id = ANY(%s) AND status = 'delivering' "
        "AND lease_owner = %s ORDER BY id FOR UPDATE) RETURNING id",  # esp_finish_attempts' order
        (now, lease_seconds, list(queue_ids), owner),
    )
    return [row[0] for row in cur.fetchall()]


def release_txn(cur: Cursor, owner: str, queue_ids: Sequence[int]) -> None:
    """Give back rows claimed but not attempted (a worker stopping): due again at once, and
    the claim does not count as an attempt."""
    cur.execute(
        "UPDATE queue SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
        "attempts = greatest(attempts - 1, 0), updated_at = now() "
        "WHERE id = ANY(%s) AND status = 'delivering' AND lease_owner = %s",
        (list(queue_ids), owner),
    )


def next_due_txn(cur: Cursor, now: datetime | None = None, owner: str = "") -> float | None:
    """Seconds until the next row falls due (a queued row's attempt, or the lease of another
    worker running out); None when the queue is empty."""
    cur.execute(
        "SELECT extract(epoch FROM least("
        "(SELECT min(next_attempt_at) FROM queue WHERE status = 'queued'), "
        "(SELECT min(lease_expires_at) FROM queue WHERE status = 'delivering' "
        "AND lease_owner IS DISTINCT FROM %s)) - coalesce(%s::timestamptz, now()))",
        (owner, now),
    )
    row = cur.fetchone()
    return float(row[0]) if row and row[0] is not None else None


@dataclass(frozen=True)
class RecipientOutcome:
    status: str  # 'sent', 'deferred' (try again) or 'bounced' (permanent)
    code: int | None = None
    text: str = ""
    status_code: str | None = None  # RFC 3463, e.g. '5.1.1'
    remote_mta: str | None = None
    # A permanent refusal by the recipient's server (not an expiry, not a local reason):
    # the address goes on the sender domain's suppression list.
    hard: bool = False


def final_outcomes(
    claim: Claim, outcomes: Mapping[str, RecipientOutcome]
) -> dict[str, RecipientOutcome]:
    """The outcomes as recorded: a recipient still deferred when the message has expired is
    bounced (with its last temporary status, as Postfix reports it)."""
    if not claim.expired:
        return dict(outcomes)
    return {
        address: RecipientOutcome("bounced", o.code, o.text or "delivery time expired",
                                  o.status_code or "4.4.7", o.remote_mta)
        if o.status == "deferred" else o
        for address, o in outcomes.items()
    }


class LeaseLost(Exception):
    """The row is no longer leased to this worker (its lease expired and another took it)."""


@dataclass(frozen=True)
class Notification:
    """A delivery status notification spooled for the sender, queued in the same transaction
    as the bounce it reports."""

    spool_name: str
    size: int
    recipient: str


@dataclass(frozen=True)
class Finished:
    status: str  # the row's new status: 'sent', 'queued' (to retry) or 'bounced'
    message_done: bool  # no row of the message is left to deliver: its spool file can go
    notification_ids: tuple[int, ...] = ()


def finish_txn(
    cur: Cursor,
    claim: Claim,
    owner: str,
    outcomes: Mapping[str, RecipientOutcome],
    now: datetime | None = None,
    schedule: Sequence[int] = DEFAULT_RETRY_SCHEDULE,
    notification: Notification | None = None,
) -> Finished:
    """Record one attempt's outcome (see :func:`finish_many_txn`); raises LeaseLost."""
    [result] = finish_many_txn(cur, owner, [(claim, outcomes, notification, ())], now,
                               schedule)
    if isinstance(result, LeaseLost):
        raise result
    return result


# An attempt's claim, outcomes per recipient, bounce report, and the outbox records of the
# events that describe its outcome (written only if the outcome is).
Attempt = tuple[Claim, Mapping[str, RecipientOutcome], "Notification | None",
                Sequence[Mapping[str, Any]]]


def finish_many_txn(
    cur: Cursor,
    owner: str,
    attempts: Sequence[Attempt],
    now: datetime | None = None,
    schedule: Sequence[int] = DEFAULT_RETRY_SCHEDULE,
    durable: bool = True,
) -> list[Finished | LeaseLost]:
    """Record the outcome of several attempts, per recipient, with one call of
    ``esp_finish_attempts`` (sql/007).  ``durable`` false: the commit does not wait for the
    WAL flush (see ``_relaxed_commit``; the caller must not remove spool files of messages
    found done until a later commit has waited, see :func:`sync_commits_txn`).

    Each row becomes 'sent' (nothing left to do), 'queued' again with its next attempt
    scheduled, or 'bounced' (expired with recipients still deferred: those are bounced too).
    Hard bounces go on the suppression list of the sender's domain; each notification (a
    bounce report) is queued to its sender.  A row no longer leased to ``owner`` is left alone
    and gets a LeaseLost in its place."""
    if not durable:
        _relaxed_commit(cur)
    finals = [(claim, final_outcomes(claim, outcomes), notification)
              for claim, outcomes, notification, _ in attempts]
    ids: list[int] = []
    waits: list[int] = []
    errors: list[str | None] = []
    columns: list[list[object]] = [[], [], [], [], [], [], []]
    for claim, final, _ in finals:
        texts = [o.text for o in final.values() if o.status != "sent" and o.text]
        ids.append(claim.queue_id)
        waits.append(backoff_seconds(claim.attempts, schedule))
        errors.append(texts[0] if texts else None)
        for address, o in final.items():
            for column, value in zip(columns, (claim.queue_id, address, o.status, o.code,
                                               o.text or None, o.status_code, o.remote_mta),
                                     strict=True):
                column.append(value)
    cur.execute(
        "SELECT queue_id, status, message_done FROM esp_finish_attempts("
        "%s, coalesce(%s::timestamptz, now()), %s::bigint[], %s::int[], %s::text[], "
        "%s::bigint[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[])",
        (owner, now, ids, waits, errors, *columns),
    )
    rows = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    live = [item for item in finals if item[0].queue_id in rows]
    _suppress(cur, live)
    notification_ids: dict[int, list[int]] = {}
    for claim, _, notification in live:
        if notification is not None:
            notification_ids[claim.queue_id] = enqueue_txn(
                cur, notification.spool_name, "", [notification.recipient], notification.size
            )
    insert_events_txn(cur, [record for claim, _, _, records in attempts
                            if claim.queue_id in rows for record in records])
    results: list[Finished | LeaseLost] = []
    for claim, _, _, _ in attempts:
        if claim.queue_id not in rows:
            results.append(LeaseLost(f"queue row {claim.queue_id} is no longer leased to "
                                     f"{owner}"))
        else:
            status, done = rows[claim.queue_id]
            results.append(Finished(status, bool(done),
                                    tuple(notification_ids.get(claim.queue_id, ()))))
    return results


def _suppress(
    cur: Cursor, live: Sequence[tuple[Claim, dict[str, RecipientOutcome], object]]
) -> None:
    """Put hard-bounced addresses on the suppression list of their sender's domain."""
    hard: dict[tuple[str, str], str] = {}
    for claim, final, _ in live:
        for address, o in final.items():
            if o.status == "bounced" and o.hard and claim.sender:
                domain = claim.sender.rpartition("@")[2].lower()
                hard[(domain, address.lower())] = o.text or ""
    if hard:
        hard = dict(sorted(hard.items()))  # one lock order for every worker
        cur.execute(
            """
            INSERT INTO suppressions (domain_id, address, reason)
            SELECT d.id, a.address, a.reason
            FROM unnest(%s::text[], %s::text[], %s::text[]) AS a (domain, address, reason)
            JOIN domains d ON d.name = a.domain
            ON CONFLICT (domain_id, address) DO UPDATE SET reason = excluded.reason,
                created_at = now()
            """,
            ([d for d, _ in hard], [a for _, a in hard], list(hard.values())),
        )


def spent_spool_files_txn(cur: Cursor, names: Sequence[str]) -> list[str]:
    """Which of ``names`` (spool files) no queue row needs any more: their message is done,
    deleted, or was never queued (a submission that failed after writing its file)."""
    cur.execute(
        "SELECT n.name FROM unnest(%s::text[]) AS n (name) WHERE NOT EXISTS "
        "(SELECT 1 FROM outbound_messages m JOIN queue q ON q.message_id = m.id "
        "WHERE m.spool_name = n.name AND q.status IN ('queued', 'delivering'))",
        (list(names),),
    )
    return [row[0] for row in cur.fetchall()]


# -- suppression list ----------------------------------------------------------------------------


def is_suppressed_txn(cur: Cursor, sender_domain: str, address: str) -> str | None:
    """The reason ``address`` is suppressed for mail from ``sender_domain``, or None."""
    cur.execute(
        "SELECT s.reason FROM suppressions s JOIN domains d ON d.id = s.domain_id "
        "WHERE d.name = lower(%s) AND s.address = lower(%s)",
        (sender_domain, address),
    )
    row = cur.fetchone()
    return str(row[0]) if row else None


@dataclass(frozen=True)
class Suppression:
    domain: str
    address: str
    reason: str
    created_at: datetime


def list_suppressions_txn(cur: Cursor, domain: str | None = None) -> list[Suppression]:
    cur.execute(
        "SELECT d.name, s.address, s.reason, s.created_at FROM suppressions s "
        "JOIN domains d ON d.id = s.domain_id WHERE %(domain)s::text IS NULL "
        "OR d.name = lower(%(domain)s) ORDER BY d.name, s.address",
        {"domain": domain},
    )
    return [Suppression(*row) for row in cur.fetchall()]


def remove_suppression_txn(cur: Cursor, domain: str, address: str) -> bool:
    cur.execute(
        "DELETE FROM suppressions s USING domains d WHERE d.id = s.domain_id "
        "AND d.name = lower(%s) AND s.address = lower(%s)",
        (domain, address),
    )
    return cur.rowcount > 0


# -- operators' view (esp queue ...) -------------------------------------------------------------


@dataclass(frozen=True)
class QueueEntry:
    queue_id: int
    message_id: int
    spool_name: str
    sender: str
    recipient_domain: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    size: int
    recipients: tuple[tuple[str, str, str | None], ...]  # address, status, last error


_ENTRY = """
    SELECT q.id, q.message_id, m.spool_name, m.sender, q.recipient_domain, q.status,
           q.attempts, q.next_attempt_at, q.last_error, q.created_at, m.size,
           coalesce((SELECT array_agg(ARRAY[r.address, r.status, coalesce(r.last_error, '')]
                     ORDER BY r.address)
                     FROM queue_recipients r WHERE r.queue_id = q.id), '{}')
    FROM queue q JOIN outbound_messages m ON m.id = q.message_id
"""


def _entry(row: Sequence[object]) -> QueueEntry:
    recipients = tuple((a, s, e or None) for a, s, e in row[11])  # type: ignore[attr-defined]
    return QueueEntry(*row[:11], recipients=recipients)  # type: ignore[arg-type, misc]


def list_queue_txn(cur: Cursor, all_rows: bool = False, limit: int = 1000) -> list[QueueEntry]:
    """Rows still to deliver (or every row, with ``all_rows``), oldest first."""
    where = "" if all_rows else "WHERE q.status IN ('queued', 'delivering')"
    cur.execute(f"{_ENTRY} {where} ORDER BY q.id LIMIT %s", (limit,))
    return [_entry(row) for row in cur.fetchall()]


def page_queue_txn(
    cur: Cursor, all_rows: bool, sender_domains: Sequence[str] | None, limit: int, offset: int,
) -> tuple[list[QueueEntry], int]:
    """Like :func:`list_queue_txn`, a page at a time, perhaps only of some sender domains."""
    cur.execute(
        f"""
        SELECT e.*, count(*) OVER () FROM ({_ENTRY}
            WHERE (%(all)s OR q.status IN ('queued', 'delivering'))
              AND (%(any_sender)s OR lower(split_part(m.sender, '@', 2)) = ANY(%(domains)s))
        ) e ORDER BY 1 LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"all": all_rows, "any_sender": sender_domains is None,
         "domains": list(sender_domains or ()), "limit": limit, "offset": offset},
    )
    rows = cur.fetchall()
    return [_entry(row[:-1]) for row in rows], (rows[0][-1] if rows else 0)


def get_queue_entry_txn(cur: Cursor, queue_id: int) -> QueueEntry | None:
    cur.execute(f"{_ENTRY} WHERE q.id = %s", (queue_id,))
    row = cur.fetchone()
    return _entry(row) if row else None


def retry_txn(cur: Cursor, queue_ids: Sequence[int] | None = None) -> int:
    """Make queued rows due now (all of them when ``queue_ids`` is None: a flush)."""
    cur.execute(
        "UPDATE queue SET next_attempt_at = now(), updated_at = now() "
        "WHERE status = 'queued' AND (%(all)s OR id = ANY(%(ids)s))",
        {"all": queue_ids is None, "ids": list(queue_ids or ())},
    )
    return int(cur.rowcount)


def delete_txn(cur: Cursor, queue_id: int) -> tuple[bool, str | None]:
    """Drop a row that is not being delivered right now (no report is sent).  Returns whether
    it was dropped and the spool file to remove when no other row needs it."""
    cur.execute(
        "UPDATE queue SET status = 'deleted', updated_at = now() "
        "WHERE id = %s AND status = 'queued' RETURNING message_id",
        (queue_id,),
    )
    row = cur.fetchone()
    if row is None:
        return False, None
    cur.execute(
        "SELECT m.spool_name FROM outbound_messages m WHERE m.id = %s AND NOT EXISTS "
        "(SELECT 1 FROM queue WHERE message_id = m.id AND status IN ('queued', 'delivering'))",
        (row[0],),
    )
    spool = cur.fetchone()
    return True, spool[0] if spool else None
