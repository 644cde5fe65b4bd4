"""The outbound queue: a spooled body plus one row per message and recipient domain.

The body is durable in the spool before the rows are committed; delivery workers claim rows with
``FOR UPDATE SKIP LOCKED`` (the outbound issue builds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esp.storage.db import Cursor


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

# Retry schedule after a temporary failure, as Postfix's (minimal_backoff_time 300 s doubling to
# maximal_backoff_time 4000 s, here 4 h): 5, 10, 20, 40, 80 min, then every 4 h until the
# message expires (5 days, then a bounce).
BACKOFF_FIRST = 300
BACKOFF_MAX = 4 * 3600


def backoff_seconds(attempts: int) -> int:
    """Wait before attempt ``attempts + 1`` after ``attempts`` failed ones (at least 1)."""
    return int(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, min(attempts - 1, 20))))


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
    expired: bool  # past expires_at: bounce what is still undelivered


def claim_due_txn(cur: Cursor, owner: str, lease_seconds: int, limit: int) -> list[Claim]:
    """Lease up to ``limit`` rows due for an attempt (or whose lease expired: a worker that died)
    to ``owner``.  ``FOR UPDATE SKIP LOCKED``: any number of workers and nodes share the queue
    without ever taking the same row."""
    cur.execute(
        """
        WITH due AS (
            SELECT id FROM queue
            WHERE (status = 'queued' AND next_attempt_at <= now())
               OR (status = 'delivering' AND lease_expires_at < now())
            ORDER BY next_attempt_at
            LIMIT %s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE queue AS q
        SET status = 'delivering', lease_owner = %s,
            lease_expires_at = now() + make_interval(secs => %s),
            attempts = q.attempts + 1, updated_at = now()
        FROM due, outbound_messages AS m
        WHERE q.id = due.id AND m.id = q.message_id
        RETURNING q.id, q.message_id, m.spool_name, m.sender, q.recipient_domain, q.attempts,
                  q.expires_at <= now()
        """,
        (limit, owner, lease_seconds),
    )
    rows = cur.fetchall()
    if not rows:
        return []
    cur.execute(
        "SELECT queue_id, address FROM queue_recipients "
        "WHERE queue_id = ANY(%s) AND status IN ('queued', 'deferred') ORDER BY address",
        ([r[0] for r in rows],),
    )
    recipients: dict[int, list[str]] = {}
    for queue_id, address in cur.fetchall():
        recipients.setdefault(queue_id, []).append(address)
    return [
        Claim(queue_id, message_id, spool, sender, domain,
              tuple(recipients.get(queue_id, ())), attempts, expired)
        for queue_id, message_id, spool, sender, domain, attempts, expired in sorted(rows)
    ]


@dataclass(frozen=True)
class RecipientOutcome:
    status: str  # 'sent', 'deferred' (try again) or 'bounced' (permanent)
    code: int | None = None
    text: str = ""


class LeaseLost(Exception):
    """The row is no longer leased to this worker (its lease expired and another took it)."""


def finish_txn(
    cur: Cursor, claim: Claim, owner: str, outcomes: dict[str, RecipientOutcome]
) -> str:
    """Record an attempt's outcome per recipient; the row becomes 'sent' (nothing left to do),
    'queued' again with the next attempt scheduled, or 'bounced' (expired with recipients still
    deferred: those are bounced too).  Returns the row's new status."""
    cur.execute(
        "SELECT 1 FROM queue WHERE id = %s AND status = 'delivering' AND lease_owner = %s "
        "FOR UPDATE",
        (claim.queue_id, owner),
    )
    if cur.fetchone() is None:
        raise LeaseLost(f"queue row {claim.queue_id} is no longer leased to {owner}")
    for address, outcome in outcomes.items():
        status = outcome.status
        if status == "deferred" and claim.expired:
            status = "bounced"
        cur.execute(
            "UPDATE queue_recipients SET status = %s, last_code = %s, last_error = %s, "
            "updated_at = now() WHERE queue_id = %s AND address = %s",
            (status, outcome.code, outcome.text or None, claim.queue_id, address),
        )
    cur.execute(
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'deferred')), "
        "count(*) FILTER (WHERE status = 'bounced') FROM queue_recipients WHERE queue_id = %s",
        (claim.queue_id,),
    )
    row = cur.fetchone()
    assert row is not None
    pending, bounced = row
    errors = [o.text for o in outcomes.values() if o.status != "sent" and o.text]
    if pending:
        status = "queued"
        cur.execute(
            "UPDATE queue SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
            "next_attempt_at = now() + make_interval(secs => %s), last_error = %s, "
            "updated_at = now() WHERE id = %s",
            (backoff_seconds(claim.attempts), errors[0] if errors else None, claim.queue_id),
        )
    else:
        status = "bounced" if bounced else "sent"
        cur.execute(
            "UPDATE queue SET status = %s, lease_owner = NULL, lease_expires_at = NULL, "
            "last_error = %s, updated_at = now() WHERE id = %s",
            (status, errors[0] if errors else None, claim.queue_id),
        )
    return status
