"""The events outbox (``event_outbox``): events that leave the process are written in the
transaction of the change they describe, then fanned out to the webhooks that want them
(``webhook_deliveries``), which dispatchers on any node claim with ``FOR UPDATE SKIP LOCKED``.
A commit that writes events notifies ``esp_events``: dispatchers wake up, nobody polls."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.extras

from esp.events import WEBHOOK_DISABLED, Event, event_record, pattern_matches
from esp.storage.db import Cursor

CHANNEL = "esp_events"

__all__ = ["CHANNEL", "event_record", "insert_events_txn"]


def insert_events_txn(cur: Cursor, records: Sequence[Mapping[str, Any]]) -> None:
    """Write events to the outbox in the caller's transaction (the one of their change)."""
    if records:
        cur.execute(events_sql(cur, records))


def events_sql(cur: Cursor, records: Sequence[Mapping[str, Any]]) -> bytes:
    """The statements that write ``records`` to the outbox and wake the dispatchers, each
    ended by a semicolon (empty without records): sent in one round trip with what follows
    them (the Maildir writer's ``COMMIT``)."""
    if not records:
        return b""
    values = b",".join(
        cur.mogrify("(%s, %s, %s, %s, %s, %s)", (
            r["id"], r["type"], r["occurred_at"], r["domain"], r["actor"],
            json.dumps(_without_nul({**r["payload"], "node": r.get("node")}), default=str)))
        for r in records
    )
    return (b"INSERT INTO event_outbox (id, type, occurred_at, domain, actor, payload) VALUES "
            + values + b" ON CONFLICT (id) DO NOTHING; "
            + cur.mogrify("SELECT pg_notify(%s, ''); ", (CHANNEL,)))


def _without_nul(value: Any) -> Any:
    """``value`` with NUL left out of its strings: PostgreSQL's jsonb cannot hold one (a
    hostile header would otherwise make its message's events, and so the message, fail at
    every attempt)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, Mapping):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def stored_events(jobs: Sequence[Sequence[Mapping[str, Any]]],
                  rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """The events carried by the message records of the jobs that were stored, completed with
    where each message went (``esp_store_messages``'s rows: job, status, mailbox, UID)."""
    found: list[dict[str, Any]] = []
    position = 0
    for job in jobs:
        mine = rows[position:position + len(job)]
        position += len(job)
        if not mine or mine[0][1] != "stored":
            continue
        for record, row in zip(job, mine, strict=True):
            event = record.get("event")
            if isinstance(event, dict):
                found.append({**event, "payload": {**event["payload"], "mailbox_id": row[2],
                                                   "uid": row[3], "size": record["size"]}})
    return found


# -- fan-out ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    id: int
    patterns: tuple[str, ...]
    domain: str | None

    def wants(self, event_type: str, domain: str | None) -> bool:
        if self.domain is not None and self.domain != domain:
            return False
        return any(pattern_matches(p, event_type) for p in self.patterns)


def enabled_endpoints_txn(cur: Cursor) -> list[Endpoint]:
    cur.execute("SELECT w.id, w.event_types, d.name FROM webhooks w "
                "LEFT JOIN domains d ON d.id = w.domain_id WHERE w.enabled ORDER BY w.id")
    return [Endpoint(i, tuple(types), domain) for i, types, domain in cur.fetchall()]


def fan_out_txn(cur: Cursor, limit: int = 500) -> int:
    """Take undispatched outbox rows (skipping those another node holds) and make a delivery
    for each webhook that wants each; how many rows were taken."""
    cur.execute(
        "SELECT id, type, domain FROM event_outbox WHERE dispatched_at IS NULL "
        "ORDER BY occurred_at, id LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
    events = cur.fetchall()
    if not events:
        return 0
    endpoints = enabled_endpoints_txn(cur)
    pairs = [(e.id, event_id) for event_id, kind, domain in events for e in endpoints
             if e.wants(kind, domain)]
    if pairs:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO webhook_deliveries (webhook_id, event_id) VALUES %s "
                 "ON CONFLICT (webhook_id, event_id) DO NOTHING", pairs)
    cur.execute("UPDATE event_outbox SET dispatched_at = now() WHERE id = ANY(%s::uuid[])",
                ([str(e[0]) for e in events],))
    return len(events)


# -- delivery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueDelivery:
    id: int
    webhook_id: int
    url: str
    secrets: tuple[str, ...]  # the current secret, and the previous one during a rotation
    attempts: int
    event_id: str
    event_type: str
    occurred_at: datetime
    domain: str | None
    actor: str | None
    payload: dict[str, Any]


def claim_deliveries_txn(cur: Cursor, owner: str, lease_seconds: float,
                         limit: int = 50) -> list[DueDelivery]:
    """Lease due deliveries (pending and due, or delivering with a lease run out), oldest
    event first."""
    cur.execute(
        """
        WITH due AS (
            SELECT d.id FROM webhook_deliveries d
            WHERE (d.status = 'pending' AND d.next_attempt_at <= now())
               OR (d.status = 'delivering' AND d.lease_expires_at < now())
            ORDER BY d.next_attempt_at, d.id LIMIT %s FOR UPDATE SKIP LOCKED
        )
        UPDATE webhook_deliveries d SET status = 'delivering', lease_owner = %s,
               lease_expires_at = now() + %s * interval '1 second', updated_at = now()
        FROM due WHERE d.id = due.id
        RETURNING d.id
        """,
        (limit, owner, lease_seconds),
    )
    ids = [row[0] for row in cur.fetchall()]
    if not ids:
        return []
    cur.execute(
        """
        SELECT d.id, w.id, w.url,
               CASE WHEN w.previous_secret IS NOT NULL AND w.previous_secret_expires_at > now()
                    THEN ARRAY[w.secret, w.previous_secret] ELSE ARRAY[w.secret] END,
               d.attempts, e.id::text, e.type, e.occurred_at, e.domain, e.actor, e.payload
        FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
        JOIN event_outbox e ON e.id = d.event_id
        WHERE d.id = ANY(%s) ORDER BY e.occurred_at, d.id
        """,
        (ids,),
    )
    return [DueDelivery(r[0], r[1], r[2], tuple(r[3]), *r[4:]) for r in cur.fetchall()]


@dataclass(frozen=True)
class AttemptOutcome:
    delivery_id: int
    status: int | None
    error: str | None
    latency_ms: int
    response: str
    delivered: bool
    gone: bool  # 410: the receiver asks us to stop
    retry_in: float | None  # None: no more tries


def finish_attempts_txn(cur: Cursor, owner: str, outcomes: Sequence[AttemptOutcome],
                        disable_after: int) -> list[int]:
    """Record attempts and their consequences; the webhooks disabled by them (a 410, or
    ``disable_after`` deliveries in a row that gave up)."""
    disabled: list[int] = []
    for o in outcomes:
        cur.execute(
            "INSERT INTO webhook_attempts (delivery_id, status, error, latency_ms, response) "
            "VALUES (%s, %s, %s, %s, %s)",
            (o.delivery_id, o.status, o.error, o.latency_ms, o.response))
        if o.delivered:
            status, next_at = "delivered", None
        elif o.retry_in is None or o.gone:
            status, next_at = "failed", None
        else:
            status, next_at = "pending", o.retry_in
        cur.execute(
            """
            UPDATE webhook_deliveries SET status = %s, attempts = attempts + 1,
                   last_status = %s, last_error = %s, lease_owner = NULL,
                   lease_expires_at = NULL, updated_at = now(),
                   next_attempt_at = CASE WHEN %s::float8 IS NULL THEN next_attempt_at
                                          ELSE now() + %s * interval '1 second' END
            WHERE id = %s AND lease_owner = %s RETURNING webhook_id
            """,
            (status, o.status, o.error, next_at, next_at, o.delivery_id, owner))
        row = cur.fetchone()
        if row is None:
            continue  # the lease was lost: another dispatcher has it now
        webhook_id = row[0]
        if o.delivered:
            cur.execute("UPDATE webhooks SET consecutive_failures = 0 WHERE id = %s "
                        "AND consecutive_failures <> 0", (webhook_id,))
            continue
        if status != "failed":
            continue  # tried again later: only a delivery that gave up counts
        reason = ("the receiver answered 410 Gone" if o.gone else
                  f"{disable_after} deliveries in a row failed")
        cur.execute(
            """
            UPDATE webhooks SET consecutive_failures = consecutive_failures + 1,
                   enabled = CASE WHEN %s OR consecutive_failures + 1 >= %s THEN false
                                  ELSE enabled END,
                   disabled_reason = CASE WHEN %s OR consecutive_failures + 1 >= %s THEN %s
                                          ELSE disabled_reason END,
                   updated_at = now()
            WHERE id = %s RETURNING enabled
            """,
            (o.gone, disable_after, o.gone, disable_after, reason, webhook_id))
        state = cur.fetchone()
        if state is not None and not state[0] and webhook_id not in disabled:
            disabled.append(webhook_id)
            _announce_disabled_txn(cur, webhook_id, reason)
    return disabled


def _announce_disabled_txn(cur: Cursor, webhook_id: int, reason: str) -> None:
    """A webhook was disabled: a line in the audit log and a webhook.disabled event (for the
    webhooks that watch the others), in the transaction that disabled it."""
    cur.execute("SELECT w.url, d.name FROM webhooks w LEFT JOIN domains d ON d.id = w.domain_id "
                "WHERE w.id = %s", (webhook_id,))
    row = cur.fetchone()
    url, domain = (row[0], row[1]) if row else ("", None)
    cur.execute("INSERT INTO audit_log (actor, action, target, details) VALUES (%s, %s, %s, %s)",
                ("esp", "webhook.disable", str(webhook_id),
                 json.dumps({"reason": reason, "url": url})))
    insert_events_txn(cur, [event_record(Event(
        WEBHOOK_DISABLED, {"webhook_id": webhook_id, "url": url, "reason": reason},
        domain=domain))])


def next_due_txn(cur: Cursor) -> float | None:
    """Seconds until the next delivery falls due (0 when one is due), None when none waits."""
    cur.execute(
        "SELECT extract(epoch FROM min(t) - now()) FROM ("
        " SELECT min(next_attempt_at) AS t FROM webhook_deliveries WHERE status = 'pending'"
        " UNION ALL SELECT min(lease_expires_at) FROM webhook_deliveries"
        " WHERE status = 'delivering') x")
    row = cur.fetchone()
    if row is None or row[0] is None:
        return None
    return max(0.0, float(row[0]))


def pending_outbox_txn(cur: Cursor) -> bool:
    cur.execute("SELECT EXISTS (SELECT 1 FROM event_outbox WHERE dispatched_at IS NULL)")
    row = cur.fetchone()
    return bool(row and row[0])
