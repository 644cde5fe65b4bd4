"""The mailbox index: message rows, UIDs, MODSEQs and quota usage in PostgreSQL.

A message body is already durable in its Maildir when :func:`add_messages_txn` records it; the
row, the UID and the quota usage are committed together, so a message is visible to IMAP exactly
when it is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from esp.storage.db import Cursor

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
    """One message for one mailbox, its file already written to the mailbox's folder."""

    mailbox_id: int
    user_id: int
    filename: str
    size: int
    internal_date: datetime
    envelope_from: str | None
    envelope_to: Sequence[str]
    message_id: str | None
    in_reply_to: str | None
    subject: str | None
    from_header: str | None
    to_header: str | None
    cc_header: str | None
    bcc_header: str | None
    sent_date: datetime | None
    headers: str
    keywords: Sequence[str] = ()
    seen: bool = False
    flagged: bool = False
    draft: bool = False
    enforce_quota: bool = False


@dataclass(frozen=True)
class StoredMessage:
    mailbox_id: int
    user_id: int
    uid: int
    modseq: int
    filename: str
    size: int
    extra: dict[str, object] = field(default_factory=dict)


def get_mailbox_txn(cur: Cursor, user_id: int, name: str) -> Mailbox:
    cur.execute(
        "SELECT id, user_id, name, folder, special_use FROM mailboxes "
        "WHERE user_id = %s AND name = %s",
        (user_id, name),
    )
    row = cur.fetchone()
    if row is None:
        raise MailboxNotFound(f"no mailbox {name!r}")
    return Mailbox(*row)


def find_special_use_txn(cur: Cursor, user_id: int, special_use: str) -> Mailbox | None:
    cur.execute(
        "SELECT id, user_id, name, folder, special_use FROM mailboxes "
        "WHERE user_id = %s AND special_use = %s",
        (user_id, special_use),
    )
    row = cur.fetchone()
    return Mailbox(*row) if row else None


def quota_room_txn(cur: Cursor, user_id: int, size: int) -> bool:
    """Whether a message of ``size`` bytes fits the user's quota now."""
    cur.execute(
        """
        SELECT (quota_bytes IS NULL OR used_bytes + %s <= quota_bytes)
           AND (quota_messages IS NULL OR used_messages + 1 <= quota_messages)
        FROM users WHERE id = %s
        """,
        (size, user_id),
    )
    row = cur.fetchone()
    return bool(row and row[0])


def add_messages_txn(cur: Cursor, messages: Sequence[NewMessage]) -> list[StoredMessage]:
    """Index messages whose files are in place: UID, row, counters, quota; notify at commit."""
    stored = []
    for m in messages:
        if m.enforce_quota:
            cur.execute(
                """
                UPDATE users SET used_bytes = used_bytes + %s, used_messages = used_messages + 1
                WHERE id = %s
                  AND (quota_bytes IS NULL OR used_bytes + %s <= quota_bytes)
                  AND (quota_messages IS NULL OR used_messages + 1 <= quota_messages)
                RETURNING id
                """,
                (m.size, m.user_id, m.size),
            )
            if cur.fetchone() is None:
                raise QuotaExceeded(f"user {m.user_id} has no room for {m.size} bytes")
        else:
            cur.execute(
                "UPDATE users SET used_bytes = used_bytes + %s, used_messages = used_messages + 1 "
                "WHERE id = %s",
                (m.size, m.user_id),
            )
        # The row lock taken here serialises UID allocation per mailbox until commit.
        cur.execute(
            """
            UPDATE mailboxes
            SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1,
                message_count = message_count + 1,
                unseen_count = unseen_count + %s,
                total_bytes = total_bytes + %s
            WHERE id = %s AND user_id = %s
            RETURNING uidnext - 1, highestmodseq
            """,
            (0 if m.seen else 1, m.size, m.mailbox_id, m.user_id),
        )
        row = cur.fetchone()
        if row is None:
            raise MailboxNotFound(f"mailbox {m.mailbox_id} of user {m.user_id} is gone")
        uid, modseq = row
        cur.execute(
            """
            INSERT INTO messages (
                mailbox_id, uid, modseq, filename, size, internal_date, seen, flagged, draft,
                keywords, envelope_from, envelope_to, message_id, in_reply_to, subject,
                from_header, to_header, cc_header, bcc_header, sent_date, headers)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                    %s, %s, %s)
            """,
            (
                m.mailbox_id, uid, modseq, m.filename, m.size, m.internal_date, m.seen,
                m.flagged, m.draft, list(m.keywords), m.envelope_from, list(m.envelope_to),
                m.message_id, m.in_reply_to, m.subject, m.from_header, m.to_header,
                m.cc_header, m.bcc_header, m.sent_date, m.headers,
            ),
        )
        cur.execute(
            "SELECT pg_notify(%s, %s)", (MAILBOX_CHANNEL, f"{m.mailbox_id}:{uid}:{modseq}")
        )
        stored.append(StoredMessage(m.mailbox_id, m.user_id, uid, modseq, m.filename, m.size))
    return stored
