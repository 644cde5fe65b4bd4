"""The mailbox index: message rows, UIDs, MODSEQs and quota usage in PostgreSQL.

A message body is already durable in its Maildir when :func:`add_messages_txn` records it; the
row, the UID and the quota usage are committed together, so a message is visible to IMAP exactly
when it is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from esp.message import MessageSummary
from esp.storage.db import Cursor, Prepared

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
    flagged: bool = False
    draft: bool = False
    enforce_quota: bool = False
    mailbox: str | None = None


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


# One statement (one round trip) per stored message: quota, UID allocation, counters, the row
# and the notification.  The mailbox row lock taken by the UPDATE serialises UID allocation per
# mailbox until commit; nothing happens unless the user update (the quota check) matched.
_ADD_MESSAGE = """
WITH usr AS (
    UPDATE users SET used_bytes = used_bytes + %(size)s, used_messages = used_messages + 1
    WHERE id = %(user_id)s
      AND (NOT %(enforce)s OR (
          (quota_bytes IS NULL OR used_bytes + %(size)s <= quota_bytes)
          AND (quota_messages IS NULL OR used_messages + 1 <= quota_messages)))
    RETURNING id
), mb AS (
    UPDATE mailboxes
    SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1,
        message_count = message_count + 1, unseen_count = unseen_count + %(unseen)s,
        total_bytes = total_bytes + %(size)s
    WHERE user_id = %(user_id)s AND (id = %(mailbox_id)s OR name = %(mailbox)s)
      AND EXISTS (SELECT 1 FROM usr)
    RETURNING id, uidnext - 1 AS uid, highestmodseq AS modseq
), ins AS (
    INSERT INTO messages (
        mailbox_id, uid, modseq, filename, size, internal_date, seen, flagged, draft,
        keywords, envelope_from, envelope_to, message_id, in_reply_to, subject,
        from_header, to_header, cc_header, bcc_header, sent_date, headers)
    SELECT mb.id, mb.uid, mb.modseq, %(filename)s, %(size)s, %(internal_date)s, %(seen)s,
           %(flagged)s, %(draft)s, %(keywords)s, %(envelope_from)s, %(envelope_to)s,
           %(message_id)s, %(in_reply_to)s, %(subject)s, %(from_header)s, %(to_header)s,
           %(cc_header)s, %(bcc_header)s, %(sent_date)s, %(headers)s
    FROM mb
    RETURNING mailbox_id, uid, modseq
)
SELECT ins.mailbox_id, ins.uid, ins.modseq,
       pg_notify('""" + MAILBOX_CHANNEL + """',
                 ins.mailbox_id || ':' || ins.uid || ':' || ins.modseq)
FROM ins
"""
ADD_MESSAGE = Prepared("esp_add_message", _ADD_MESSAGE)


def add_message_params(m: NewMessage) -> dict[str, object]:
    summary = m.summary
    return {
        "user_id": m.user_id, "mailbox_id": m.mailbox_id, "mailbox": m.mailbox,
        "size": m.size, "enforce": m.enforce_quota, "unseen": 0 if m.seen else 1,
        "filename": m.filename, "internal_date": m.internal_date, "seen": m.seen,
        "flagged": m.flagged, "draft": m.draft, "keywords": list(m.keywords),
        "envelope_from": m.envelope_from, "envelope_to": list(m.envelope_to),
        "message_id": summary.message_id, "in_reply_to": summary.in_reply_to,
        "subject": summary.subject, "from_header": summary.from_header,
        "to_header": summary.to_header, "cc_header": summary.cc_header,
        "bcc_header": summary.bcc_header, "sent_date": summary.sent_date,
        # PostgreSQL text cannot hold NUL.
        "headers": summary.header_text.replace("\x00", ""),
    }


def add_messages_txn(cur: Cursor, messages: Sequence[NewMessage]) -> list[StoredMessage]:
    """Index messages whose files are in place: UID, row, counters, quota; notify at commit."""
    stored = []
    for m in messages:
        ADD_MESSAGE.execute(cur, add_message_params(m))
        row = cur.fetchone()
        if row is None:
            if m.enforce_quota and not quota_room_txn(cur, m.user_id, m.size):
                raise QuotaExceeded(f"user {m.user_id} has no room for {m.size} bytes")
            raise MailboxNotFound(
                f"mailbox {m.mailbox_id or m.mailbox!r} of user {m.user_id} does not exist"
            )
        mailbox_id, uid, modseq, _ = row
        stored.append(StoredMessage(mailbox_id, m.user_id, uid, modseq, m.filename, m.size))
    return stored
