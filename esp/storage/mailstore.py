"""The mailbox index: message rows, UIDs, MODSEQs and quota usage in PostgreSQL.

A message body is already durable in its Maildir when :func:`add_messages_txn` records it; the
row, the UID and the quota usage are committed together, so a message is visible to IMAP exactly
when it is counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from esp.message import MessageSummary
from esp.storage.db import Cursor, Prepared
from esp.storage.outbox import insert_events_txn, stored_events

# Sent with pg_notify at commit, so IDLE sessions on any node learn of new mail.
MAILBOX_CHANNEL = "esp_mailbox"


class QuotaExceeded(Exception):
    """Storing the message would take the user over their quota."""


class MailboxNotFound(Exception):
    pass


@dataclass(frozen=True)
class Mailbox:
    id: int
    user_id: int
    name: str
    folder: str
    special_use: str | None


@dataclass(frozen=True)
class NewMessage:
    """One message for one mailbox (given by id, or by name), its file already written to the
    mailbox's folder."""

    mailbox_id: int | None
    user_id: int
    filename: str
    size: int
    internal_date: datetime
    envelope_from: str | None
    envelope_to: Sequence[str]
    summary: MessageSummary  # the header fields indexed for search
    keywords: Sequence[str] = ()
    seen: bool = False
    answered: bool = False
    flagged: bool = False
    deleted: bool = False
    draft: bool = False
    enforce_quota: bool = False
    mailbox: str | None = None
    # The message.received event to write to the outbox with the row (esp.storage.outbox).
    event: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StoredMessage:
    mailbox_id: int
    user_id: int
    uid: int
    modseq: int
    filename: str
    size: int


def find_special_use_txn(cur: Cursor, user_id: int, special_use: str) -> Mailbox | None:
    cur.execute(
        "SELECT id, user_id, name, folder, special_use FROM mailboxes "
        "WHERE user_id = %s AND special_use = %s",
        (user_id, special_use),
    )
    row = cur.fetchone()
    return Mailbox(*row) if row else None


def find_mailbox_txn(cur: Cursor, user_id: int, name: str) -> Mailbox | None:
    cur.execute(
        "SELECT id, user_id, name, folder, special_use FROM mailboxes "
        "WHERE user_id = %s AND name = %s",
        (user_id, name),
    )
    row = cur.fetchone()
    return Mailbox(*row) if row else None


# Every message is recorded by this one statement (sql/002_store_messages.sql): quota, UID
# allocation, counters, the row and the notification, for a whole batch of deliveries at once.
STORE_MESSAGES = Prepared(
    "esp_store_messages",
    "SELECT job, status, mailbox_id, uid, modseq FROM esp_store_messages(%(batch)s::jsonb)",
)


def record_fields(m: NewMessage) -> dict[str, object]:
    """The JSON record of one message for ``esp_store_messages``."""
    summary = m.summary
    return {
        "user_id": m.user_id, "mailbox_id": m.mailbox_id, "mailbox": m.mailbox,
        "enforce": m.enforce_quota, "filename": m.filename, "size": m.size,
        "internal_date": m.internal_date.isoformat(), "seen": m.seen, "answered": m.answered,
        "flagged": m.flagged, "deleted": m.deleted, "draft": m.draft,
        "keywords": list(m.keywords), "envelope_from": m.envelope_from,
        "envelope_to": list(m.envelope_to), "message_id": summary.message_id,
        "in_reply_to": summary.in_reply_to, "subject": summary.subject,
        "from_header": summary.from_header, "to_header": summary.to_header,
        "cc_header": summary.cc_header, "bcc_header": summary.bcc_header,
        "sent_date": summary.sent_date.isoformat() if summary.sent_date else None,
        # PostgreSQL text cannot hold NUL.
        "headers": summary.header_text.replace("\x00", ""),
        **({"event": dict(m.event)} if m.event is not None else {}),
    }


def store_params(jobs: Sequence[Sequence[NewMessage]]) -> dict[str, object]:
    """The parameters of :data:`STORE_MESSAGES` for ``jobs`` (each job all or nothing).

    One JSON document rather than two dozen parameters per message: the C JSON encoder and
    PostgreSQL's jsonb parser cost far less than quoting each value on its own.
    """
    return {"batch": json.dumps([[record_fields(m) for m in job] for job in jobs],
                                separators=(",", ":"))}


JobOutcome = list[StoredMessage] | QuotaExceeded | MailboxNotFound


def rows_per_job(
    jobs: Sequence[Sequence[object]], rows: Sequence[Sequence[Any]]
) -> list[tuple[str, Sequence[Sequence[Any]]]]:
    """``esp_store_messages``'s rows (one per message, in order: job index, status, mailbox id,
    UID, MODSEQ) split by job: (status of the job, its rows)."""
    result: list[tuple[str, Sequence[Sequence[Any]]]] = []
    position = 0
    for index, job in enumerate(jobs):
        mine = rows[position:position + len(job)]
        position += len(job)
        if len(mine) != len(job) or any(row[0] != index for row in mine):
            raise RuntimeError("esp_store_messages answered out of order")
        result.append((mine[0][1], mine))
    return result


def store_outcomes(
    jobs: Sequence[Sequence[NewMessage]], rows: Sequence[Sequence[Any]]
) -> list[JobOutcome]:
    """What :data:`STORE_MESSAGES` did with each job: the stored messages, or why none was."""
    outcomes: list[JobOutcome] = []
    for job, (status, mine) in zip(jobs, rows_per_job(jobs, rows), strict=True):
        if status == "stored":
            outcomes.append([
                StoredMessage(row[2], m.user_id, row[3], row[4], m.filename, m.size)
                for m, row in zip(job, mine, strict=True)
            ])
        elif status == "over_quota":
            outcomes.append(QuotaExceeded(
                f"user {job[0].user_id} has no room for {job[0].size} bytes"
            ))
        else:
            outcomes.append(MailboxNotFound(
                "a mailbox of " + ", ".join(f"{m.mailbox_id or m.mailbox!r} of user {m.user_id}"
                                           for m in job) + " does not exist"
            ))
    return outcomes


def add_messages_txn(cur: Cursor, messages: Sequence[NewMessage]) -> list[StoredMessage]:
    """Index messages whose files are in place, all or none: UIDs, rows, counters, quota;
    notify at commit."""
    if not messages:
        return []
    STORE_MESSAGES.execute(cur, store_params([messages]))
    rows = cur.fetchall()
    outcome = store_outcomes([messages], rows)[0]
    if isinstance(outcome, Exception):
        raise outcome
    insert_events_txn(cur, stored_events([[record_fields(m) for m in messages]], rows))
    return outcome
