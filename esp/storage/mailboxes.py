"""Mailboxes as a mail client sees them: listing, selecting, reading and changing messages.

Transaction functions over the ``mailboxes``, ``messages`` and ``mailbox_expunges`` tables,
for the IMAP server (and later the API).  Every change to a mailbox takes a new MODSEQ
(RFC 7162) from ``mailboxes.highestmodseq`` under the mailbox's row lock, and is announced on
:data:`esp.storage.mailstore.MAILBOX_CHANNEL` at commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2.extras
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from esp.storage import bodyindex
from esp.storage.db import Cursor, Database, DatabaseUnavailable
from esp.storage.maildir import (
    Maildir,
    StoredFile,
    folder_directory,
    fsync_directory,
    remove_files,
    retire,
    unique_name,
)
from esp.storage.mailsearch import (
    Criterion,
    body_criteria,
    search_txn,
    sort_txn,
)
from esp.storage.mailstore import MAILBOX_CHANNEL, NewMessage, QuotaExceeded
from esp.storage.outbox import insert_events_txn

# Given what a transaction changed, the outbox records of the events that describe it.
Announce = Callable[[list[Any]], Sequence[Mapping[str, Any]]]

# Flags stored as columns; anything else is a keyword.
SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
_FLAG_COLUMNS = {"\\seen": "seen", "\\answered": "answered", "\\flagged": "flagged",
                 "\\deleted": "deleted", "\\draft": "draft"}


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    name: str
    special_use: str | None
    subscribed: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    unseen: int
    size: int
    has_children: bool = False
    folder: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What SELECT needs: the mailbox and the UIDs of its messages in order."""

    mailbox: MailboxInfo
    uids: list[int]
    first_unseen_uid: int | None
    keywords: list[str]  # every keyword in use in the mailbox


@dataclass(frozen=True)
class MessageRow:
    uid: int
    modseq: int
    flags: tuple[str, ...]
    internal_date: datetime
    size: int
    filename: str


def flags_of(system_columns: Sequence[bool], keywords: Sequence[str]) -> tuple[str, ...]:
    """The IMAP flags of a row: (seen, answered, flagged, deleted, draft) and keywords."""
    system = [name for name, on in zip(SYSTEM_FLAGS, system_columns, strict=True) if on]
    return (*system, *keywords)


_INFO_COLUMNS = """
    b.id, b.name, b.special_use, b.subscribed, b.uidvalidity, b.uidnext, b.highestmodseq,
    b.message_count, b.unseen_count, b.total_bytes,
    EXISTS (SELECT 1 FROM mailboxes c WHERE c.user_id = b.user_id
            AND left(c.name, length(b.name) + 1) = b.name || '/'),
    b.folder
"""


def list_mailboxes_txn(cur: Cursor, user_id: int) -> list[MailboxInfo]:
    cur.execute(
        f"SELECT {_INFO_COLUMNS} FROM mailboxes b WHERE b.user_id = %s ORDER BY b.name",
        (user_id,),
    )
    return [MailboxInfo(*row) for row in cur.fetchall()]


def mailbox_info_txn(cur: Cursor, user_id: int, name: str) -> MailboxInfo | None:
    cur.execute(
        f"SELECT {_INFO_COLUMNS} FROM mailboxes b WHERE b.user_id = %s AND b.name = %s",
        (user_id, name),
    )
    row = cur.fetchone()
    return MailboxInfo(*row) if row else None


def select_txn(cur: Cursor, user_id: int, name: str) -> Snapshot | None:
    """The mailbox and its UIDs, in one snapshot (REPEATABLE READ is not needed: the UIDs are
    read after the counters, and any message added in between is announced by NOTIFY)."""
    info = mailbox_info_txn(cur, user_id, name)
    if info is None:
        return None
    cur.execute("SELECT uid FROM messages WHERE mailbox_id = %s ORDER BY uid", (info.id,))
    uids = [row[0] for row in cur.fetchall()]
    cur.execute(
        "SELECT min(uid) FROM messages WHERE mailbox_id = %s AND NOT seen", (info.id,)
    )
    row = cur.fetchone()
    cur.execute(
        "SELECT DISTINCT unnest(keywords) FROM messages WHERE mailbox_id = %s ORDER BY 1",
        (info.id,),
    )
    keywords = [r[0] for r in cur.fetchall()]
    return Snapshot(info, uids, row[0] if row else None, keywords)


_ROW_COLUMNS = """uid, modseq, seen, answered, flagged, deleted, draft, keywords, internal_date,
    size, filename"""


def _message_row(r: Sequence[Any]) -> MessageRow:
    """A row of ``_ROW_COLUMNS``."""
    return MessageRow(r[0], r[1], flags_of(r[2:7], r[7]), r[8], r[9], r[10])


def _next_modseq(cur: Cursor, mailbox_id: int) -> int | None:
    """Take the mailbox's next MODSEQ (locking its row until commit); None if it is gone."""
    cur.execute(
        "UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = %s "
        "RETURNING highestmodseq",
        (mailbox_id,),
    )
    row = cur.fetchone()
    return row[0] if row else None


def _notify(cur: Cursor, mailbox_id: int, uid: int, modseq: int) -> None:
    """Announce a change at commit (esp.storage.notify hands it to IDLE sessions)."""
    cur.execute("SELECT pg_notify(%s, %s)", (MAILBOX_CHANNEL, f"{mailbox_id}:{uid}:{modseq}"))


def _record_expunges(cur: Cursor, mailbox_id: int, uids: Iterable[int], modseq: int) -> None:
    cur.executemany(
        "INSERT INTO mailbox_expunges (mailbox_id, uid, modseq) VALUES (%s, %s, %s) "
        "ON CONFLICT (mailbox_id, uid) DO UPDATE SET modseq = EXCLUDED.modseq",
        [(mailbox_id, uid, modseq) for uid in uids],
    )


def _release_usage(cur: Cursor, user_id: int, size: int, count: int) -> None:
    """Give back quota usage (never below zero)."""
    cur.execute(
        """
        UPDATE users SET used_bytes = greatest(used_bytes - %s, 0),
               used_messages = greatest(used_messages - %s, 0)
        WHERE id = %s
        """,
        (size, count, user_id),
    )


def fetch_rows_txn(cur: Cursor, mailbox_id: int, uids: Sequence[int]) -> list[MessageRow]:
    """The rows of the messages ``uids`` that still exist, in UID order."""
    cur.execute(
        f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox_id = %s AND uid = ANY(%s) "
        "ORDER BY uid",
        (mailbox_id, list(uids)),
    )
    return [_message_row(row) for row in cur.fetchall()]


def changes_since_txn(
    cur: Cursor, mailbox_id: int, modseq: int
) -> tuple[int, list[MessageRow], list[int]]:
    """(highest MODSEQ, messages changed or added after ``modseq``, UIDs expunged after it)."""
    cur.execute("SELECT highestmodseq FROM mailboxes WHERE id = %s", (mailbox_id,))
    row = cur.fetchone()
    if row is None:
        return modseq, [], []
    highest = row[0]
    if highest == modseq:
        return highest, [], []
    cur.execute(
        f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox_id = %s AND modseq > %s "
        "ORDER BY uid",
        (mailbox_id, modseq),
    )
    changed = [_message_row(r) for r in cur.fetchall()]
    cur.execute(
        "SELECT uid FROM mailbox_expunges WHERE mailbox_id = %s AND modseq > %s ORDER BY uid",
        (mailbox_id, modseq),
    )
    return highest, changed, [r[0] for r in cur.fetchall()]


def store_flags_txn(
    cur: Cursor, mailbox_id: int, uids: Sequence[int], mode: str, flags: Iterable[str],
    unchanged_since: int | None = None,
) -> list[MessageRow]:
    """Set (``mode`` '='), add ('+') or remove ('-') flags; return the rows that changed.

    With ``unchanged_since`` (RFC 7162 UNCHANGEDSINCE) only messages whose MODSEQ is not
    above it are changed; the caller finds the others by comparing MODSEQs.
    """
    system: dict[str, bool] = {}
    keywords: list[str] = []
    for flag in flags:
        column = _FLAG_COLUMNS.get(flag.lower())
        if column is not None:
            system[column] = True
        elif not flag.startswith("\\"):
            keywords.append(flag)
    sets = []
    params: list[object] = []
    for column in _FLAG_COLUMNS.values():
        if mode == "=":
            sets.append(f"{column} = %s")
            params.append(column in system)
        elif column in system:
            sets.append(f"{column} = %s")
            params.append(mode == "+")
    if mode == "=":
        sets.append("keywords = %s")
        params.append(sorted(set(keywords)))
    elif keywords and mode == "+":
        sets.append("keywords = ARRAY(SELECT DISTINCT k FROM unnest(keywords || %s::text[]) k "
                    "ORDER BY k)")
        params.append(keywords)
    elif keywords:
        sets.append("keywords = ARRAY(SELECT k FROM unnest(keywords) k "
                    "WHERE k <> ALL(%s::text[]) ORDER BY k)")
        params.append(keywords)
    if not sets:
        return []
    modseq = _next_modseq(cur, mailbox_id)
    if modseq is None:
        return []
    changed_condition = " OR ".join(f"({s.split(' = ', 1)[0]} IS DISTINCT FROM "
                                    f"({s.split(' = ', 1)[1]}))" for s in sets)
    cur.execute(
        f"""
        UPDATE messages SET {", ".join(sets)}, modseq = %s
        WHERE mailbox_id = %s AND uid = ANY(%s) AND ({changed_condition})
          AND (%s::bigint IS NULL OR modseq <= %s::bigint)
        RETURNING {_ROW_COLUMNS}
        """,
        (*params, modseq, mailbox_id, list(uids), *params, unchanged_since, unchanged_since),
    )
    rows = [_message_row(r) for r in cur.fetchall()]
    cur.execute(
        """
        UPDATE mailboxes SET unseen_count =
            (SELECT count(*) FROM messages WHERE mailbox_id = %s AND NOT seen)
        WHERE id = %s
        """,
        (mailbox_id, mailbox_id),
    )
    _notify(cur, mailbox_id, 0, modseq)
    return sorted(rows, key=lambda r: r.uid)


def expunge_txn(
    cur: Cursor, mailbox_id: int, user_id: int, uids: Sequence[int] | None = None,
    only_deleted: bool = True, announce: Announce | None = None,
) -> list[tuple[int, str]]:
    """Remove the messages flagged \\Deleted (only those among ``uids`` when given); return
    their (UID, file name), for the caller to delete the files after the commit.
    ``announce`` gets the UIDs removed and returns the events to write to the outbox."""
    modseq = _next_modseq(cur, mailbox_id)
    if modseq is None:
        return []
    condition = "" if uids is None else " AND uid = ANY(%s)"
    params: tuple[object, ...] = (mailbox_id,) if uids is None else (mailbox_id, list(uids))
    cur.execute(
        f"DELETE FROM messages WHERE mailbox_id = %s"
        f"{' AND deleted' if only_deleted else ''}{condition} "
        "RETURNING uid, filename, size, seen",
        params,
    )
    removed = sorted(cur.fetchall())
    if not removed:
        return []
    _record_expunges(cur, mailbox_id, [uid for uid, *_ in removed], modseq)
    size = sum(r[2] for r in removed)
    unseen = sum(1 for r in removed if not r[3])
    cur.execute(
        """
        UPDATE mailboxes SET message_count = message_count - %s,
               unseen_count = unseen_count - %s, total_bytes = total_bytes - %s
        WHERE id = %s
        """,
        (len(removed), unseen, size, mailbox_id),
    )
    _release_usage(cur, user_id, size, len(removed))
    _notify(cur, mailbox_id, 0, modseq)
    if announce is not None:
        insert_events_txn(cur, announce([uid for uid, *_ in removed]))
    return [(uid, filename) for uid, filename, *_ in removed]


def copy_messages_txn(
    cur: Cursor, source_id: int, target_id: int, user_id: int,
    copies: Sequence[tuple[int, str]],
) -> list[tuple[int, int]]:
    """Copy the rows of ``copies`` (source UID, the copy's file name in the target folder)
    into the target mailbox with new UIDs; return (source UID, new UID) pairs.  The copies
    count against the quota: QuotaExceeded when they do not fit."""
    if not copies:
        return []
    cur.execute(
        "SELECT uid, size, seen FROM messages WHERE mailbox_id = %s AND uid = ANY(%s)",
        (source_id, [uid for uid, _ in copies]),
    )
    found = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    copies = [(uid, name) for uid, name in copies if uid in found]
    if not copies:
        return []
    size = sum(found[uid][0] for uid, _ in copies)
    unseen = sum(1 for uid, _ in copies if not found[uid][1])
    cur.execute(
        """
        UPDATE users SET used_bytes = used_bytes + %s, used_messages = used_messages + %s
        WHERE id = %s AND (quota_bytes IS NULL OR used_bytes + %s <= quota_bytes)
          AND (quota_messages IS NULL OR used_messages + %s <= quota_messages)
        """,
        (size, len(copies), user_id, size, len(copies)),
    )
    if cur.rowcount == 0:
        raise QuotaExceeded(f"user {user_id} has no room for {size} bytes")
    cur.execute(
        """
        UPDATE mailboxes SET uidnext = uidnext + %s, highestmodseq = highestmodseq + 1,
               message_count = message_count + %s, unseen_count = unseen_count + %s,
               total_bytes = total_bytes + %s
        WHERE id = %s AND user_id = %s RETURNING uidnext - %s, highestmodseq
        """,
        (len(copies), len(copies), unseen, size, target_id, user_id, len(copies)),
    )
    row = cur.fetchone()
    if row is None:
        raise NoMailbox("the target mailbox does not exist")
    first_uid, modseq = row
    pairs = [(uid, first_uid + i) for i, (uid, _) in enumerate(copies)]
    cur.executemany(
        """
        INSERT INTO messages (
            mailbox_id, uid, modseq, filename, size, internal_date, seen, answered, flagged,
            deleted, draft, keywords, envelope_from, envelope_to, message_id, in_reply_to,
            subject, from_header, to_header, cc_header, bcc_header, sent_date, headers,
            envelope, bodystructure, body_tsv)
        SELECT %s, %s, %s, %s, size, internal_date, seen, answered, flagged, deleted, draft,
               keywords, envelope_from, envelope_to, message_id, in_reply_to, subject,
               from_header, to_header, cc_header, bcc_header, sent_date, headers, envelope,
               bodystructure, body_tsv
        FROM messages WHERE mailbox_id = %s AND uid = %s
        """,
        [(target_id, new, modseq, name, source_id, old)
         for (old, new), (_, name) in zip(pairs, copies, strict=True)],
    )
    _notify(cur, target_id, 0, modseq)
    return pairs


def import_messages_txn(
    cur: Cursor, user_id: int, mailbox: str, messages: Sequence[NewMessage]
) -> list[int]:
    """Record many messages (files already in the mailbox's folder) in one go, for imports
    and migrations: one UID range, one multi-row insert; no quota check.  Their UIDs."""
    if not messages:
        return []
    count = len(messages)
    unseen = sum(1 for m in messages if not m.seen)
    size = sum(m.size for m in messages)
    cur.execute(
        """
        UPDATE mailboxes SET uidnext = uidnext + %s, highestmodseq = highestmodseq + 1,
               message_count = message_count + %s, unseen_count = unseen_count + %s,
               total_bytes = total_bytes + %s
        WHERE user_id = %s AND name = %s RETURNING id, uidnext - %s, highestmodseq
        """,
        (count, count, unseen, size, user_id, mailbox, count),
    )
    row = cur.fetchone()
    if row is None:
        raise NoMailbox(f"{mailbox} does not exist")
    mailbox_id, first_uid, modseq = row
    rows = []
    for i, m in enumerate(messages):
        s = m.summary
        rows.append((
            mailbox_id, first_uid + i, modseq, m.filename, m.size, m.internal_date, m.seen,
            m.answered, m.flagged, m.deleted, m.draft, list(m.keywords), m.envelope_from,
            list(m.envelope_to), s.message_id, s.in_reply_to, s.subject, s.from_header,
            s.to_header, s.cc_header, s.bcc_header, s.sent_date,
            s.header_text.replace("\x00", ""),
        ))
    psycopg2.extras.execute_values(
        cur,
        """
        INSERT INTO messages (
            mailbox_id, uid, modseq, filename, size, internal_date, seen, answered, flagged,
            deleted, draft, keywords, envelope_from, envelope_to, message_id, in_reply_to,
            subject, from_header, to_header, cc_header, bcc_header, sent_date, headers)
        VALUES %s
        """,
        rows, page_size=1000,
    )
    cur.execute(
        "UPDATE users SET used_bytes = used_bytes + %s, used_messages = used_messages + %s "
        "WHERE id = %s",
        (size, count, user_id),
    )
    _notify(cur, mailbox_id, 0, modseq)
    return list(range(first_uid, first_uid + count))


class MailboxError(Exception):
    """The mailbox operation is not possible (the message says why, for a NO)."""


class MailboxExists(MailboxError):
    pass


class NoMailbox(MailboxError):
    pass


class InvalidMailboxName(MailboxError):
    pass


# The hierarchy delimiter of mailbox names, and their longest (UTF-8 bytes).
DELIMITER = "/"
MAX_NAME = 512


def check_mailbox_name(name: str) -> str:
    """``name`` when it may name a new mailbox: no empty, '.' or '..' level, no control
    characters, no IMAP wildcards, not too long; else InvalidMailboxName."""
    parts = name.split(DELIMITER)
    if (not name or len(name.encode()) > MAX_NAME or name.startswith(DELIMITER)
            or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
            or any(c in name for c in "*%")):
        raise InvalidMailboxName(f"invalid mailbox name {name!r}")
    return name


def create_mailbox_txn(cur: Cursor, user_id: int, name: str,
                       announce: Announce | None = None) -> list[str]:
    """Create ``name`` and any missing parent; return the names created.  ``announce`` gets
    those names and returns the events to write to the outbox."""
    parts = name.split("/")
    created = []
    for depth in range(1, len(parts) + 1):
        path = "/".join(parts[:depth])
        cur.execute(
            """
            INSERT INTO mailboxes (user_id, name, folder) VALUES (%s, %s, %s)
            ON CONFLICT DO NOTHING RETURNING id
            """,
            (user_id, path, folder_directory(path)),
        )
        if cur.fetchone() is not None:
            created.append(path)
        elif depth == len(parts):
            raise MailboxExists(f"{name} already exists")
    if announce is not None:
        insert_events_txn(cur, announce(created))
    return created


def delete_mailbox_txn(cur: Cursor, user_id: int, name: str) -> str:
    """Delete a mailbox and its messages; return its folder, for the caller to remove."""
    if name.upper() == "INBOX":
        raise MailboxError("INBOX cannot be deleted")
    info = mailbox_info_txn(cur, user_id, name)
    if info is None:
        raise NoMailbox(f"{name} does not exist")
    if info.has_children:
        raise MailboxError(f"{name} has child mailboxes; delete them first")
    _release_usage(cur, user_id, info.size, info.messages)
    cur.execute("DELETE FROM mailboxes WHERE id = %s", (info.id,))
    _notify(cur, info.id, -1, 0)
    return info.folder


def rename_mailbox_txn(cur: Cursor, user_id: int, old: str, new: str) -> None:
    """Rename a mailbox and its children; their Maildir folders stay where they are."""
    if new.upper() == "INBOX" or new.startswith(old + "/"):
        raise MailboxError(f"cannot rename {old} to {new}")
    if mailbox_info_txn(cur, user_id, old) is None:
        raise NoMailbox(f"{old} does not exist")
    if mailbox_info_txn(cur, user_id, new) is not None:
        raise MailboxExists(f"{new} already exists")
    parent = new.rpartition("/")[0]
    if parent:
        try:
            create_mailbox_txn(cur, user_id, parent)
        except MailboxExists:
            pass
    cur.execute(
        """
        UPDATE mailboxes SET name = %s || substr(name, length(%s) + 1)
        WHERE user_id = %s AND (name = %s OR left(name, length(%s) + 1) = %s || '/')
        """,
        (new, old, user_id, old, old, old),
    )


def filenames_txn(cur: Cursor, mailbox_id: int) -> list[tuple[int, str]]:
    cur.execute(
        "SELECT uid, filename FROM messages WHERE mailbox_id = %s ORDER BY uid", (mailbox_id,)
    )
    return [(row[0], row[1]) for row in cur.fetchall()]


def move_inbox_txn(cur: Cursor, user_id: int, new: str) -> tuple[int, list[tuple[int, str]]]:
    """RENAME INBOX (RFC 3501 §6.3.5), step one: create ``new``; return its id and the
    (UID, file name) of every INBOX message, whose files the caller links into its folder."""
    if mailbox_info_txn(cur, user_id, new) is not None:
        raise MailboxExists(f"{new} already exists")
    create_mailbox_txn(cur, user_id, new)
    info = mailbox_info_txn(cur, user_id, new)
    inbox = mailbox_info_txn(cur, user_id, "INBOX")
    assert info is not None and inbox is not None
    return info.id, filenames_txn(cur, inbox.id)


def finish_inbox_move_txn(cur: Cursor, user_id: int, target_id: int, uids: Sequence[int]) -> int:
    """Step two: the rows of ``uids`` move from INBOX to the target (same UIDs, a fresh
    UIDVALIDITY there); INBOX is left empty and records their expunge.  Returns INBOX's id."""
    inbox = mailbox_info_txn(cur, user_id, "INBOX")
    if inbox is None:
        raise NoMailbox("INBOX does not exist")
    modseq = _next_modseq(cur, inbox.id)
    assert modseq is not None
    cur.execute(
        """
        UPDATE messages SET mailbox_id = %s, modseq = 1
        WHERE mailbox_id = %s AND uid = ANY(%s)
        RETURNING uid, size, seen
        """,
        (target_id, inbox.id, list(uids)),
    )
    moved = cur.fetchall()
    size = sum(r[1] for r in moved)
    unseen = sum(1 for r in moved if not r[2])
    cur.execute(
        """
        UPDATE mailboxes SET uidnext = greatest(uidnext, %s), message_count = %s,
               unseen_count = %s, total_bytes = %s
        WHERE id = %s
        """,
        (max((r[0] for r in moved), default=0) + 1, len(moved), unseen, size, target_id),
    )
    cur.execute(
        """
        UPDATE mailboxes SET message_count = message_count - %s,
               unseen_count = unseen_count - %s, total_bytes = total_bytes - %s
        WHERE id = %s
        """,
        (len(moved), unseen, size, inbox.id),
    )
    _record_expunges(cur, inbox.id, [r[0] for r in moved], modseq)
    _notify(cur, inbox.id, 0, modseq)
    return inbox.id


def subscribe_txn(cur: Cursor, user_id: int, name: str, subscribed: bool) -> None:
    cur.execute(
        "UPDATE mailboxes SET subscribed = %s WHERE user_id = %s AND name = %s",
        (subscribed, user_id, name),
    )
    if cur.rowcount == 0:
        raise NoMailbox(f"{name} does not exist")


def folder_of_txn(cur: Cursor, mailbox_id: int) -> str:
    cur.execute("SELECT folder FROM mailboxes WHERE id = %s", (mailbox_id,))
    row = cur.fetchone()
    return row[0] if row else ""



class MailboxStore:
    """The mailbox operations for services: named transactions, and message files read or
    removed in the disk pool."""

    def __init__(self, db: Database, maildir_root: Path, disk_pool: ThreadPool,
                 reactor: Any) -> None:
        self._db = db
        self._root = maildir_root
        self._disk_pool = disk_pool
        self._reactor = reactor
        self._changes: dict[tuple[int, int], list[Deferred[Any]]] = {}

    async def mailboxes(self, user_id: int) -> list[MailboxInfo]:
        return await self._db.run("list_mailboxes", list_mailboxes_txn, user_id)

    async def info(self, user_id: int, name: str) -> MailboxInfo | None:
        return await self._db.run("mailbox_info", mailbox_info_txn, user_id, name)

    async def select(self, user_id: int, name: str) -> Snapshot | None:
        return await self._db.run("select_mailbox", select_txn, user_id, name)

    async def rows(self, mailbox_id: int, uids: Sequence[int]) -> list[MessageRow]:
        return await self._db.run("fetch_rows", fetch_rows_txn, mailbox_id, uids)

    async def changes(
        self, mailbox_id: int, modseq: int
    ) -> tuple[int, list[MessageRow], list[int]]:
        """What changed after ``modseq``.  Sessions asking the same question at the same time
        (every IDLE session of a mailbox, woken by one delivery) share one query."""
        key = (mailbox_id, modseq)
        waiting = self._changes.get(key)
        if waiting is not None:
            d: Deferred[tuple[int, list[MessageRow], list[int]]] = Deferred()
            waiting.append(d)
            return await d
        self._changes[key] = []
        try:
            result = await self._db.run("mailbox_changes", changes_since_txn, mailbox_id,
                                        modseq)
        except BaseException as e:
            for d in self._changes.pop(key):
                d.errback(e)
            raise
        for d in self._changes.pop(key):
            d.callback(result)
        return result

    async def store(
        self, mailbox_id: int, uids: Sequence[int], mode: str, flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> list[MessageRow]:
        return await self._db.run("store_flags", store_flags_txn, mailbox_id, uids, mode,
                                  flags, unchanged_since)

    async def expunge(
        self, maildir: str, mailbox_id: int, user_id: int, uids: Sequence[int] | None = None,
        only_deleted: bool = True, announce: Announce | None = None,
    ) -> list[int]:
        """Remove the \\Deleted messages (or, with ``only_deleted`` false, exactly ``uids``);
        their files go after the commit."""
        removed, folder = await self._db.run(
            "expunge", _expunge_with_folder_txn, mailbox_id, user_id, uids, only_deleted,
            announce,
        )
        if removed:
            box = Maildir(self._root / maildir).folder(folder)
            await deferToThreadPool(
                self._reactor, self._disk_pool, _remove_messages, box, [f for _, f in removed]
            )
        return [uid for uid, _ in removed]

    async def create(self, user_id: int, name: str,
                     announce: Announce | None = None) -> list[str]:
        return await self._db.run("create_mailbox", create_mailbox_txn, user_id, name,
                                  announce)

    async def delete(self, maildir: str, user_id: int, name: str) -> None:
        folder = await self._db.run("delete_mailbox", delete_mailbox_txn, user_id, name)
        if folder:
            await deferToThreadPool(
                self._reactor, self._disk_pool, retire,
                self._root, f"{maildir}/{folder}",
            )

    async def rename(self, maildir: str, user_id: int, old: str, new: str) -> None:
        if old.upper() != "INBOX":
            await self._db.run("rename_mailbox", rename_mailbox_txn, user_id, old, new)
            return
        if new.upper() == "INBOX":
            raise MailboxError("cannot rename INBOX to INBOX")
        # RFC 3501 §6.3.5: INBOX's messages move to the new mailbox; INBOX stays, empty.
        target_id, files = await self._db.run("move_inbox", move_inbox_txn, user_id, new)
        inbox = Maildir(self._root / maildir)
        target = Maildir(self._root / maildir).folder(folder_directory(new))
        linked = await deferToThreadPool(
            self._reactor, self._disk_pool, _link_same_names, inbox, target,
            [name for _, name in files],
        )
        await self._db.run("finish_inbox_move", finish_inbox_move_txn, user_id, target_id,
                           [uid for uid, name in files if name in linked])
        await deferToThreadPool(self._reactor, self._disk_pool, _remove_messages, inbox,
                                list(linked))

    async def subscribe(self, user_id: int, name: str, subscribed: bool) -> None:
        await self._db.run("subscribe", subscribe_txn, user_id, name, subscribed)

    async def search(
        self, maildir: str, mailbox_id: int, criterion: Criterion,
        sort: Sequence[tuple[str, bool]] = (),
    ) -> list[int]:
        if any(True for _ in body_criteria(criterion)):
            # Messages the indexer has not come to yet are indexed now: a search never
            # misses one because it arrived a moment ago.
            while await self.index_bodies(mailbox_id) == bodyindex.BATCH:
                pass
        if sort:
            return await self._db.run("sort", sort_txn, mailbox_id, sort, criterion)
        return await self._db.run("search", search_txn, mailbox_id, criterion)

    async def index_bodies(self, mailbox_id: int | None = None,
                           limit: int = bodyindex.BATCH) -> int:
        """Add up to ``limit`` messages not yet in the body index (of one mailbox, or of
        any) to it; how many were found."""
        return await self._db.run(
            "index_bodies", bodyindex.index_batch_txn, self._root, mailbox_id, limit
        )

    async def copy(
        self, maildir: str, user_id: int, source_id: int, uids: Sequence[int],
        target: MailboxInfo,
    ) -> list[tuple[int, int]]:
        """Copy messages (files hard-linked, rows with new UIDs); (source UID, new UID)."""
        rows = await self.rows(source_id, uids)
        source = Maildir(self._root / maildir).folder(await self._folder(source_id))
        box = Maildir(self._root / maildir).folder(target.folder)
        files = await deferToThreadPool(
            self._reactor, self._disk_pool, _link_copies, source, box,
            [(r.filename, r.size) for r in rows],
        )
        try:
            return await self._db.run(
                "copy_messages", copy_messages_txn, source_id, target.id, user_id,
                [(r.uid, f.name) for r, f in zip(rows, files, strict=True)],
            )
        except DatabaseUnavailable:
            raise  # the outcome is unknown: keep the files (orphans at worst)
        except BaseException:
            await deferToThreadPool(self._reactor, self._disk_pool, remove_files,
                                    [f.path for f in files])
            raise

    async def read_many(
        self, maildir: str, folder: str, filenames: Sequence[str]
    ) -> dict[str, bytes]:
        """Several message files of the mailbox in ``folder`` (``MailboxInfo.folder``), in one
        trip to the disk pool (a missing one is left out)."""
        box = Maildir(self._root / maildir).folder(folder)
        return await deferToThreadPool(self._reactor, self._disk_pool, _read_all, box,
                                       filenames)

    async def _folder(self, mailbox_id: int) -> str:
        return await self._db.run("mailbox_folder", folder_of_txn, mailbox_id)


def _expunge_with_folder_txn(
    cur: Cursor, mailbox_id: int, user_id: int, uids: Sequence[int] | None,
    only_deleted: bool = True, announce: Announce | None = None,
) -> tuple[list[tuple[int, str]], str]:
    return (expunge_txn(cur, mailbox_id, user_id, uids, only_deleted, announce),
            folder_of_txn(cur, mailbox_id))


def _remove_messages(box: Maildir, names: Sequence[str]) -> None:
    for name in names:
        try:
            box.remove(name)
        except FileNotFoundError:
            pass


def _link_copies(
    source: Maildir, target: Maildir, files: Sequence[tuple[str, int]]
) -> list[StoredFile]:
    """Hard links (copies where links fail) of message files under new names in ``target``,
    durable when this returns."""
    target.create()
    made: list[StoredFile] = []
    try:
        for name, size in files:
            path = source.locate(name)
            new_name = f"{unique_name()},S={size}"
            destination = target.path / "new" / new_name
            try:
                os.link(path, destination)
            except OSError:
                made.append(target.deliver(path.read_bytes()))
                continue
            made.append(StoredFile(new_name, destination, size))
        fsync_directory(target.path / "new")
    except BaseException:
        remove_files([f.path for f in made])
        raise
    return made


def _link_same_names(source: Maildir, target: Maildir, names: Sequence[str]) -> set[str]:
    """Link message files into ``target`` under the same names (durably); the names done."""
    target.create()
    done = set()
    for name in names:
        try:
            path = source.locate(name)
        except FileNotFoundError:
            continue
        try:
            os.link(path, target.path / "new" / name)
        except FileExistsError:
            pass
        done.add(name)
    fsync_directory(target.path / "new")
    return done


def _read_all(box: Maildir, names: Sequence[str]) -> dict[str, bytes]:
    found = {}
    for name in names:
        try:
            found[name] = box.read(name)
        except FileNotFoundError:
            continue
    return found
