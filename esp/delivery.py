"""Local delivery: the one path by which a message lands in mailboxes (SMTP, API, APPEND...).

Order, for "no lost mail": each body is written to its Maildir (``tmp/`` → fsync → ``new/`` →
fsync of the directory) in a disk thread; then one PostgreSQL transaction records every copy (UID,
row, quota) and queues any remote recipients; only after the commit does the caller answer 250.
If the transaction fails, the files are removed again and the caller answers 4xx, so a retry by
the client cannot create a duplicate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esp.events import MESSAGE_RECEIVED, Event, EventBus
from esp.message import MessageSummary, summarize
from esp.storage.db import Cursor, Database, DatabaseUnavailable
from esp.storage.maildir import Maildir, MaildirError, StoredFile
from esp.storage.mailstore import (
    ADD_MESSAGE,
    MailboxNotFound,
    NewMessage,
    QuotaExceeded,
    StoredMessage,
    add_message_params,
    add_messages_txn,
)
from esp.storage.pgasync import AsyncDatabase
from esp.storage.queue import enqueue_txn


class DeliveryFailed(Exception):
    """Nothing was stored; the sender should try again later (4xx)."""


class MailboxFull(Exception):
    """A recipient is over quota; nothing was stored."""


@dataclass(frozen=True)
class LocalRecipient:
    user_id: int
    address: str
    maildir: str  # relative to the Maildir root
    folder: str = ""  # Maildir++ folder; '' is INBOX
    mailbox: str = "INBOX"
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryResult:
    stored: tuple[StoredMessage, ...]
    queued: tuple[int, ...]


class LocalDelivery:
    log = Logger()

    def __init__(
        self,
        db: Database,
        maildir_root: Path,
        spool_dir: Path,
        disk_pool: ThreadPool,
        events: EventBus,
        reactor: Any,
        fast: AsyncDatabase | None = None,
    ) -> None:
        self._db = db
        self._fast = fast
        self._root = maildir_root
        self._spool = Maildir(spool_dir)
        self._disk_pool = disk_pool
        self._events = events
        self._reactor = reactor

    def prepare(self) -> None:
        """Create the spool; blocking, at start-up."""
        self._spool.create()

    async def deliver(
        self,
        message: bytes,
        sender: str,
        local: Sequence[LocalRecipient],
        remote: Sequence[str] = (),
        sender_user_id: int | None = None,
        enforce_quota: bool = False,
        event_payload: dict[str, object] | None = None,
    ) -> DeliveryResult:
        """Store ``message`` for every local recipient and queue it for the remote ones."""
        summary = summarize(message)
        received = datetime.now(UTC)
        try:
            queued: list[int] = []
            if self._fast is not None and len(local) == 1 and not remote:
                stored = await self._deliver_one(
                    message, summary, received, sender, local[0], enforce_quota
                )
            else:
                # Files and rows in one trip to a pool thread: the transaction starts with its
                # first statement, after the files are durable.
                stored, queued = await self._db.run(
                    "deliver_message", self._deliver_txn, message, summary, received, sender,
                    local, remote, sender_user_id, enforce_quota,
                )
        except QuotaExceeded as e:
            raise MailboxFull(str(e)) from e
        except (MaildirError, OSError) as e:
            self.log.error("cannot write message files: {error}", error=str(e))
            raise DeliveryFailed(str(e)) from e
        except (DatabaseUnavailable, MailboxNotFound) as e:
            raise DeliveryFailed(str(e)) from e
        except Exception as e:
            self.log.failure("recording a delivery failed")
            raise DeliveryFailed(str(e)) from e
        for item, recipient in zip(stored, local, strict=True):
            self._events.publish(
                Event(
                    MESSAGE_RECEIVED,
                    {
                        "user": recipient.address,
                        "mailbox": recipient.mailbox,
                        "uid": item.uid,
                        "size": item.size,
                        "sender": sender,
                        "message_id": summary.message_id,
                        **(event_payload or {}),
                    },
                    domain=recipient.address.rpartition("@")[2],
                )
            )
        return DeliveryResult(tuple(stored), tuple(queued))

    async def _deliver_one(
        self,
        message: bytes,
        summary: MessageSummary,
        received: datetime,
        sender: str,
        recipient: LocalRecipient,
        enforce_quota: bool,
    ) -> list[StoredMessage]:
        """The common case, one local recipient: the file in a disk thread, then one statement
        (its own transaction) on the reactor."""
        assert self._fast is not None
        files, _ = await deferToThreadPool(
            self._reactor, self._disk_pool, self._write_files, message, [recipient], False
        )
        record = _new_message(recipient, files[0], summary, sender, received, enforce_quota)
        try:
            rows = await self._fast.fetch(ADD_MESSAGE, add_message_params(record))
            if not rows:
                raise MailboxNotFound(f"no mailbox {recipient.mailbox} for {recipient.address}")
        except DatabaseUnavailable:
            # The connection failed after the statement may have reached the server: the row
            # may exist.  A file without a row can be re-indexed; a row without its file is a
            # lost message.  Keep the file.
            self.log.warn("delivery outcome unknown; keeping {path}", path=str(files[0].path))
            raise
        except BaseException:
            # Not recorded means not delivered: take the file back so a retry cannot duplicate.
            await deferToThreadPool(
                self._reactor, self._disk_pool, _remove, [f.path for f in files]
            )
            raise
        mailbox_id, uid, modseq, _ = rows[0]
        return [StoredMessage(mailbox_id, recipient.user_id, uid, modseq, files[0].name,
                              files[0].size)]

    def _deliver_txn(
        self,
        cur: Cursor,
        message: bytes,
        summary: MessageSummary,
        received: datetime,
        sender: str,
        local: Sequence[LocalRecipient],
        remote: Sequence[str],
        sender_user_id: int | None,
        enforce_quota: bool,
    ) -> tuple[list[StoredMessage], list[int]]:
        files, spooled = self._write_files(message, local, bool(remote))
        try:
            records = [
                _new_message(recipient, stored, summary, sender, received, enforce_quota)
                for recipient, stored in zip(local, files, strict=True)
            ]
            stored = add_messages_txn(cur, records)
            queued: list[int] = []
            if remote and spooled is not None:
                queued = enqueue_txn(
                    cur, spooled.name, sender, remote, spooled.size, sender_user_id
                )
        except BaseException:
            # Not recorded means not delivered: take the files back so a retry cannot
            # duplicate.
            _remove([f.path for f in files] + ([spooled.path] if spooled else []))
            raise
        # Committed here, not by the pool, to know the outcome: a commit refused by the server
        # rolled everything back (remove the files); a connection lost during the commit leaves
        # the outcome unknown (keep them: a row without its file would be a lost message).
        try:
            cur.connection.commit()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            self.log.warn("delivery outcome unknown; keeping {paths}",
                          paths=[str(f.path) for f in files])
            raise
        except BaseException:
            _remove([f.path for f in files] + ([spooled.path] if spooled else []))
            raise
        return stored, queued

    def _write_files(
        self, message: bytes, local: Sequence[LocalRecipient], spool: bool
    ) -> tuple[list[StoredFile], StoredFile | None]:
        written: list[StoredFile] = []
        first: StoredFile | None = None
        try:
            for recipient in local:
                box = Maildir(self._root / recipient.maildir).folder(recipient.folder)
                if first is None:
                    box.create()
                    first = box.deliver(message)
                    written.append(first)
                else:
                    written.append(_link_or_copy(first, box, message))
            spooled = self._spool.deliver(message) if spool else None
        except BaseException:
            _remove([f.path for f in written])
            raise
        return written, spooled

def _link_or_copy(original: StoredFile, box: Maildir, message: bytes) -> StoredFile:
    """The same bytes for another mailbox: a hard link when the filesystem allows it."""
    box.create()
    target = box.path / "new" / original.name
    try:
        os.link(original.path, target)
    except OSError:
        return box.deliver(message)
    fd = os.open(box.path / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return StoredFile(original.name, target, original.size)


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _new_message(
    recipient: LocalRecipient,
    stored: StoredFile,
    summary: MessageSummary,
    sender: str,
    received: datetime,
    enforce_quota: bool,
) -> NewMessage:
    return NewMessage(
        mailbox_id=None,
        mailbox=recipient.mailbox,
        user_id=recipient.user_id,
        filename=stored.name,
        size=stored.size,
        internal_date=received,
        envelope_from=sender,
        envelope_to=(recipient.address,),
        summary=summary,
        keywords=recipient.keywords,
        enforce_quota=enforce_quota,
    )
