"""The management API's reads and writes that the mail paths never need: paged listings with
filters, partial updates, the audit log, webhooks.  Each listing returns (rows, total)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.extras

from esp.storage.db import Cursor
from esp.storage.directory import _USER_COLUMNS, Domain, NotFound, User, _user
from esp.storage.mailboxes import flags_of
from esp.storage.mailsearch import like_pattern

# -- domains -----------------------------------------------------------------------------------


def page_domains_txn(
    cur: Cursor, domain_ids: Sequence[int] | None, limit: int, offset: int,
) -> tuple[list[Domain], int]:
    """Domains (only ``domain_ids`` unless None), by name, with their user and alias counts."""
    cur.execute(
        """
        SELECT d.id, d.name, d.enabled,
               (SELECT count(*) FROM users u WHERE u.domain_id = d.id),
               (SELECT count(*) FROM aliases a WHERE a.domain_id = d.id),
               count(*) OVER ()
        FROM domains d WHERE %(all)s OR d.id = ANY(%(ids)s)
        ORDER BY d.name LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"all": domain_ids is None, "ids": list(domain_ids or ()), "limit": limit,
         "offset": offset},
    )
    rows = cur.fetchall()
    return [Domain(*row[:5]) for row in rows], (rows[0][5] if rows else 0)


def domain_counts_txn(cur: Cursor, domain_id: int) -> Domain:
    cur.execute(
        """
        SELECT d.id, d.name, d.enabled,
               (SELECT count(*) FROM users u WHERE u.domain_id = d.id),
               (SELECT count(*) FROM aliases a WHERE a.domain_id = d.id)
        FROM domains d WHERE d.id = %s
        """,
        (domain_id,),
    )
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"no domain {domain_id}")
    return Domain(*row)


def set_domain_enabled_txn(cur: Cursor, domain_id: int, enabled: bool) -> Domain:
    cur.execute("UPDATE domains SET enabled = %s, updated_at = now() WHERE id = %s",
                (enabled, domain_id))
    return domain_counts_txn(cur, domain_id)


# -- users -------------------------------------------------------------------------------------


def page_users_txn(
    cur: Cursor, domain_id: int | None, query: str | None, limit: int, offset: int,
) -> tuple[list[User], int]:
    cur.execute(
        f"""
        SELECT {_USER_COLUMNS}, count(*) OVER ()
        FROM users u JOIN domains d ON d.id = u.domain_id
        WHERE (%(domain)s::bigint IS NULL OR u.domain_id = %(domain)s)
          AND (%(q)s::text IS NULL OR u.localpart || '@' || d.name ILIKE %(q)s)
        ORDER BY d.name, u.localpart LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"domain": domain_id, "q": like_pattern(query) if query else None, "limit": limit,
         "offset": offset},
    )
    rows = cur.fetchall()
    return [_user(row[:-1]) for row in rows], (rows[0][-1] if rows else 0)


USER_FIELDS = ("display_name", "role", "enabled", "quota_bytes", "quota_messages")


def update_user_txn(cur: Cursor, user_id: int, changes: Mapping[str, object]) -> User:
    """Set the given columns (of :data:`USER_FIELDS`; None lifts a quota)."""
    unknown = set(changes) - set(USER_FIELDS)
    if unknown:
        raise ValueError(f"not user fields: {', '.join(sorted(unknown))}")
    if changes:
        assignments = ", ".join(f"{name} = %({name})s" for name in changes)
        cur.execute(
            f"UPDATE users SET {assignments}, updated_at = now() WHERE id = %(id)s",
            {**changes, "id": user_id},
        )
    cur.execute(
        f"SELECT {_USER_COLUMNS} FROM users u JOIN domains d ON d.id = u.domain_id "
        "WHERE u.id = %s",
        (user_id,),
    )
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"no user {user_id}")
    return _user(row)


def identities_txn(cur: Cursor, user: User) -> list[str]:
    """The addresses ``user`` may send as: their own and the aliases that name them (a
    catch-all does not count)."""
    cur.execute(
        """
        SELECT a.localpart || '@' || d.name FROM aliases a JOIN domains d ON d.id = a.domain_id
        WHERE a.destination = %s AND a.localpart <> '' ORDER BY 1
        """,
        (user.address,),
    )
    return [user.address, *(row[0] for row in cur.fetchall() if row[0] != user.address)]


# -- aliases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasRow:
    id: int
    domain_id: int
    source: str
    destination: str


_ALIAS = """
    SELECT a.id, a.domain_id, a.localpart || '@' || d.name, a.destination
    FROM aliases a JOIN domains d ON d.id = a.domain_id
"""


def page_aliases_txn(
    cur: Cursor, domain_ids: Sequence[int] | None, limit: int, offset: int,
) -> tuple[list[AliasRow], int]:
    cur.execute(
        f"""
        SELECT q.*, count(*) OVER () FROM ({_ALIAS}
            WHERE %(all)s OR a.domain_id = ANY(%(ids)s)) q
        ORDER BY 3, 4 LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"all": domain_ids is None, "ids": list(domain_ids or ()), "limit": limit,
         "offset": offset},
    )
    rows = cur.fetchall()
    return [AliasRow(*row[:4]) for row in rows], (rows[0][4] if rows else 0)


def get_alias_txn(cur: Cursor, alias_id: int) -> AliasRow | None:
    cur.execute(f"{_ALIAS} WHERE a.id = %s", (alias_id,))
    row = cur.fetchone()
    return AliasRow(*row) if row else None


def find_alias_txn(cur: Cursor, domain_id: int, localpart: str, destination: str) -> AliasRow:
    cur.execute(f"{_ALIAS} WHERE a.domain_id = %s AND a.localpart = %s AND a.destination = %s",
                (domain_id, localpart, destination))
    row = cur.fetchone()
    if row is None:
        raise NotFound("no such alias")
    return AliasRow(*row)


def delete_alias_txn(cur: Cursor, alias_id: int) -> None:
    cur.execute("DELETE FROM aliases WHERE id = %s", (alias_id,))


# -- audit log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    id: int
    occurred_at: datetime
    actor: str
    actor_ip: str | None
    action: str
    target: str | None
    details: dict[str, Any]


def page_audit_txn(
    cur: Cursor, *, actor: str | None, action: str | None, target: str | None,
    since: datetime | None, until: datetime | None, limit: int, offset: int,
) -> tuple[list[AuditRow], int]:
    """Newest first.  ``action`` ending in ``.*`` matches every action under that prefix."""
    prefix = action[:-1] if action is not None and action.endswith(".*") else None
    cur.execute(
        """
        SELECT id, occurred_at, actor, host(actor_ip), action, target, details, count(*) OVER ()
        FROM audit_log
        WHERE (%(actor)s::text IS NULL OR actor = %(actor)s)
          AND (%(action)s::text IS NULL OR action = %(action)s
               OR (%(prefix)s::text IS NOT NULL AND starts_with(action, %(prefix)s)))
          AND (%(target)s::text IS NULL OR target = %(target)s)
          AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s)
          AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s)
        ORDER BY id DESC LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"actor": actor, "action": action, "prefix": prefix, "target": target,
         "since": since, "until": until, "limit": limit, "offset": offset},
    )
    rows = cur.fetchall()
    return [AuditRow(*row[:7]) for row in rows], (rows[0][7] if rows else 0)


# -- webhooks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookRow:
    id: int
    url: str
    event_types: list[str]
    domain_id: int | None
    domain: str | None
    enabled: bool
    consecutive_failures: int
    disabled_reason: str | None
    created_at: datetime
    secret: str


_WEBHOOK = """
    SELECT w.id, w.url, w.event_types, w.domain_id, d.name, w.enabled,
           w.consecutive_failures, w.disabled_reason, w.created_at, w.secret
    FROM webhooks w LEFT JOIN domains d ON d.id = w.domain_id
"""


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_webhook_txn(
    cur: Cursor, url: str, event_types: Sequence[str], domain_id: int | None, enabled: bool,
) -> WebhookRow:
    cur.execute(
        "INSERT INTO webhooks (url, event_types, domain_id, secret, enabled) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (url, list(event_types), domain_id, new_webhook_secret(), enabled),
    )
    row = cur.fetchone()
    assert row is not None
    made = get_webhook_txn(cur, row[0])
    assert made is not None
    return made


def get_webhook_txn(cur: Cursor, webhook_id: int) -> WebhookRow | None:
    cur.execute(f"{_WEBHOOK} WHERE w.id = %s", (webhook_id,))
    row = cur.fetchone()
    return WebhookRow(*row) if row else None


def page_webhooks_txn(
    cur: Cursor, domain_ids: Sequence[int] | None, limit: int, offset: int,
) -> tuple[list[WebhookRow], int]:
    """Webhooks of the given domains (None: all, server-wide ones included)."""
    cur.execute(
        f"""
        SELECT q.*, count(*) OVER () FROM ({_WEBHOOK}
            WHERE %(all)s OR w.domain_id = ANY(%(ids)s)) q
        ORDER BY 1 LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"all": domain_ids is None, "ids": list(domain_ids or ()), "limit": limit,
         "offset": offset},
    )
    rows = cur.fetchall()
    return [WebhookRow(*row[:10]) for row in rows], (rows[0][10] if rows else 0)


WEBHOOK_FIELDS = ("url", "event_types", "enabled")


def update_webhook_txn(cur: Cursor, webhook_id: int, changes: Mapping[str, object]) -> WebhookRow:
    unknown = set(changes) - set(WEBHOOK_FIELDS)
    if unknown:
        raise ValueError(f"not webhook fields: {', '.join(sorted(unknown))}")
    if changes:
        assignments = ", ".join(f"{name} = %({name})s" for name in changes)
        # Enabling again clears the record of failures that disabled it.
        reset = (", consecutive_failures = 0, disabled_reason = NULL"
                 if changes.get("enabled") is True else "")
        cur.execute(
            f"UPDATE webhooks SET {assignments}{reset}, updated_at = now() WHERE id = %(id)s",
            {**changes, "id": webhook_id},
        )
    row = get_webhook_txn(cur, webhook_id)
    if row is None:
        raise NotFound(f"no webhook {webhook_id}")
    return row


def delete_webhook_txn(cur: Cursor, webhook_id: int) -> None:
    cur.execute("DELETE FROM webhooks WHERE id = %s", (webhook_id,))



# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageMeta:
    id: int
    mailbox_id: int
    uid: int
    size: int
    flags: tuple[str, ...]
    internal_date: datetime
    sent_date: datetime | None
    subject: str | None
    from_header: str | None
    to_header: str | None
    cc_header: str | None
    message_id: str | None
    filename: str


_MESSAGE = """
    SELECT id, mailbox_id, uid, size, seen, answered, flagged, deleted, draft, keywords,
           internal_date, sent_date, subject, from_header, to_header, cc_header, message_id,
           filename
    FROM messages
"""


def _meta(row: Sequence[Any]) -> MessageMeta:
    return MessageMeta(row[0], row[1], row[2], row[3], flags_of(row[4:9], row[9]), *row[10:18])


def page_messages_txn(
    cur: Cursor, mailbox_id: int, uids: Sequence[int] | None, limit: int, offset: int,
) -> tuple[list[MessageMeta], int]:
    """Messages of the mailbox (only ``uids`` unless None), newest (highest UID) first."""
    if uids is None:
        cur.execute("SELECT message_count FROM mailboxes WHERE id = %s", (mailbox_id,))
        row = cur.fetchone()
        total = row[0] if row else 0
        cur.execute(f"{_MESSAGE} WHERE mailbox_id = %s ORDER BY uid DESC LIMIT %s OFFSET %s",
                    (mailbox_id, limit, offset))
        return [_meta(r) for r in cur.fetchall()], total
    chosen = sorted(uids, reverse=True)[offset:offset + limit]
    cur.execute(f"{_MESSAGE} WHERE mailbox_id = %s AND uid = ANY(%s) ORDER BY uid DESC",
                (mailbox_id, chosen))
    return [_meta(r) for r in cur.fetchall()], len(uids)


def message_meta_txn(cur: Cursor, mailbox_id: int, uid: int) -> MessageMeta | None:
    cur.execute(f"{_MESSAGE} WHERE mailbox_id = %s AND uid = %s", (mailbox_id, uid))
    row = cur.fetchone()
    return _meta(row) if row else None


# -- per-domain filter choices -----------------------------------------------------------------


def domain_filters_txn(cur: Cursor, domains: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``domains.settings -> 'filters'`` of each named domain ({} when unset)."""
    cur.execute("SELECT name, coalesce(settings -> 'filters', '{}'::jsonb) FROM domains "
                "WHERE name = ANY(%s)", (list(domains),))
    return {name: dict(value) if isinstance(value, dict) else {}
            for name, value in cur.fetchall()}


def set_domain_filters_txn(cur: Cursor, domain_id: int, filters: dict[str, Any]) -> None:
    cur.execute("UPDATE domains SET settings = jsonb_set(settings, '{filters}', %s), "
                "updated_at = now() WHERE id = %s",
                (psycopg2.extras.Json(filters), domain_id))


# -- webhook deliveries ------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRow:
    attempted_at: datetime
    status: int | None
    error: str | None
    latency_ms: int
    response: str | None


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    tries: list[AttemptRow]


def page_deliveries_txn(
    cur: Cursor, webhook_id: int, limit: int, offset: int,
) -> tuple[list[DeliveryRow], int]:
    """A webhook's deliveries, newest first, each with its attempts."""
    cur.execute(
        """
        SELECT d.id, d.event_id::text, e.type, d.status, d.attempts, d.next_attempt_at,
               d.last_status, d.last_error, d.created_at, count(*) OVER ()
        FROM webhook_deliveries d JOIN event_outbox e ON e.id = d.event_id
        WHERE d.webhook_id = %s ORDER BY d.id DESC LIMIT %s OFFSET %s
        """,
        (webhook_id, limit, offset))
    rows = cur.fetchall()
    tries: dict[int, list[AttemptRow]] = {row[0]: [] for row in rows}
    if rows:
        cur.execute("SELECT delivery_id, attempted_at, status, error, latency_ms, response "
                    "FROM webhook_attempts WHERE delivery_id = ANY(%s) ORDER BY id",
                    (list(tries),))
        for delivery_id, *attempt in cur.fetchall():
            tries[delivery_id].append(AttemptRow(*attempt))
    return ([DeliveryRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                         row[8], tries[row[0]]) for row in rows],
            rows[0][9] if rows else 0)


def redeliver_txn(cur: Cursor, webhook_id: int, delivery_id: int) -> bool:
    """Make a delivery due again now (also one that gave up), unless one is under way."""
    cur.execute(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), "
        "updated_at = now() WHERE id = %s AND webhook_id = %s AND status <> 'delivering' "
        "RETURNING id", (delivery_id, webhook_id))
    if cur.fetchone() is None:
        return False
    cur.execute("SELECT pg_notify('esp_events', '')")
    return True


def rotate_secret_txn(cur: Cursor, webhook_id: int, overlap_seconds: int) -> str:
    """A new secret; the old one keeps signing too for ``overlap_seconds``."""
    secret = new_webhook_secret()
    cur.execute(
        "UPDATE webhooks SET previous_secret = secret, secret = %s, "
        "previous_secret_expires_at = now() + %s * interval '1 second', updated_at = now() "
        "WHERE id = %s", (secret, overlap_seconds, webhook_id))
    return secret
