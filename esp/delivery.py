"""Local delivery: the one path by which a message lands in mailboxes (SMTP, API, APPEND...).

Order, for "no lost mail": each body is written to its Maildir (``tmp/`` → fsync → ``new/`` →
fsync of the directory); then one PostgreSQL transaction records every copy (UID, row, quota)
and queues any remote recipients; only after the commit does the caller answer 250.  If the
transaction fails, the files are removed again and the caller answers 4xx, so a retry by the
client cannot create a duplicate.

Deliveries to local mailboxes only (the common case) are done entirely by the Maildir writer
process (:mod:`esp.storage.diskwriter`), which group-commits them: each message is sent to it
as soon as it is complete, and it takes every delivery waiting (from every process of the
node) as one group, writes their files (one fsync per directory), records them with one
statement and one commit, and answers.  Each message still gets its own answer: one that
fails (a mailbox gone, a quota) fails alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esp.batching import Batcher
from esp.events import MESSAGE_RECEIVED, Event, EventBus, event_record
from esp.message import MessageSummary, summarize
from esp.storage.db import Cursor, Database, DatabaseUnavailable
from esp.storage.diskwriter import REQUESTS_AT_ONCE, Delivery, DiskWriter, SharedDiskWriter
from esp.storage.maildir import (
    Maildir,
    MaildirError,
    StoredFile,
    deliver_unsynced,
    fsync_directory,
    remove_files,
)
from esp.storage.mailstore import (
    MailboxNotFound,
    NewMessage,
    QuotaExceeded,
    StoredMessage,
    add_messages_txn,
    record_fields,
)
from esp.storage.queue import enqueue_txn
from esp.storage.recorder import Outcome


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
    # IMAP system flags the message starts with (APPEND): \Seen, \Answered, \Flagged...
    flags: tuple[str, ...] = ()


# Jobs per batch: PostgreSQL keeps 64 subtransactions per transaction in shared memory (each
# job of a batch is one); past that, every snapshot gets slower.
BATCH_LIMIT = 32


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
        dsn: str | None = None,
        share_writer: bool = False,
        writer_address: str | None = None,
    ) -> None:
        """With ``share_writer``, the Maildir writer this process starts is used by this
        node's worker processes too (:attr:`writer_address`); a worker process is given that
        address as ``writer_address`` and starts none of its own."""
        self._db = db
        self._root = maildir_root
        self._spool = Maildir(spool_dir)
        self._disk_pool = disk_pool
        self._events = events
        self._reactor = reactor
        self._writer: DiskWriter | SharedDiskWriter = (
            SharedDiskWriter(reactor, maildir_root, writer_address) if writer_address
            else DiskWriter(reactor, maildir_root, dsn, shared=share_writer)
        )
        self._deliveries: Batcher[Delivery, Outcome] = Batcher(
            self._writer.deliver, BATCH_LIMIT, REQUESTS_AT_ONCE
        )
        # Called after something was queued for remote recipients (wakes the delivery workers).
        self.on_queued: Callable[[], None] | None = None
        # Messages stored in mailboxes by this process since it started.
        self.stored = 0

    @property
    def writer_address(self) -> str | None:
        """Where worker processes reach the shared Maildir writer (once prepared)."""
        return self._writer.address if isinstance(self._writer, DiskWriter) else None

    def prepare(self) -> None:
        """Create the spool and start the Maildir writer; blocking, at start-up."""
        self._spool.create()
        self._writer.start()

    def close(self) -> Deferred[None]:
        """Stop the Maildir writer once it has written what it was given."""
        return self._writer.stop()

    async def deliver(
        self,
        message: bytes,
        sender: str,
        local: Sequence[LocalRecipient],
        remote: Sequence[str] = (),
        sender_user_id: int | None = None,
        enforce_quota: bool = False,
        event_payload: dict[str, object] | None = None,
        internal_date: datetime | None = None,
    ) -> DeliveryResult:
        """Store ``message`` for every local recipient and queue it for the remote ones."""
        summary = summarize(message)
        received = internal_date or datetime.now(UTC)
        events = [
            Event(MESSAGE_RECEIVED,
                  {"user": recipient.address, "mailbox": recipient.mailbox, "sender": sender,
                   "message_id": summary.message_id, **(event_payload or {})},
                  domain=recipient.address.rpartition("@")[2])
            for recipient in local
        ]
        # Those that leave the process are written with the message, in its transaction.
        try:
            wants = await self._events.leaving()
        except DatabaseUnavailable as e:
            raise DeliveryFailed(str(e)) from e
        outboxed = [event_record(e) if wants(e.type, e.domain) else None for e in events]
        try:
            queued: list[int] = []
            if not remote:
                stored = await self._deliver_local(
                    message, summary, received, sender, local, enforce_quota, outboxed
                )
            else:
                # Files and rows in one trip to a pool thread: the transaction starts with its
                # first statement, after the files are durable.
                stored, queued = await self._db.run(
                    "deliver_message", self._deliver_txn, message, summary, received, sender,
                    local, remote, sender_user_id, enforce_quota, outboxed,
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
        self.stored += len(stored)
        if queued and self.on_queued is not None:
            self.on_queued()
        for item, event in zip(stored, events, strict=True):
            # The same event (and id) as the outbox row, with where the message went.
            self._events.publish(replace(event, payload={
                **event.payload, "mailbox_id": item.mailbox_id, "uid": item.uid,
                "size": item.size}))
        return DeliveryResult(tuple(stored), tuple(queued))

    async def _deliver_local(
        self,
        message: bytes,
        summary: MessageSummary,
        received: datetime,
        sender: str,
        local: Sequence[LocalRecipient],
        enforce_quota: bool,
        outboxed: Sequence[dict[str, Any] | None],
    ) -> list[StoredMessage]:
        """The common case, local recipients only: files and rows, group-committed, in one
        trip to the Maildir writer."""
        if not local:
            return []
        records = [
            record_fields(_new_message(recipient, None, summary, sender, received,
                                       enforce_quota, event))
            for recipient, event in zip(local, outboxed, strict=True)
        ]
        status, value = await self._deliveries.submit(
            (message, tuple((r.maildir, r.folder) for r in local), tuple(records))
        )
        if status == "stored":
            return [
                StoredMessage(mailbox_id, recipient.user_id, uid, modseq, name, size)
                for (mailbox_id, uid, modseq, name, _path, size), recipient
                in zip(value, local, strict=True)
            ]
        if status == "over_quota":
            raise QuotaExceeded(f"{local[0].address}: {value}")
        if status == "no_mailbox":
            raise MailboxNotFound(value)
        if status == "unknown":
            self.log.warn("delivery outcome unknown ({error}); its files were kept", error=value)
        raise DeliveryFailed(value)

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
        outboxed: Sequence[dict[str, Any] | None],
    ) -> tuple[list[StoredMessage], list[int]]:
        files, spooled = self._write_files(message, local, bool(remote))
        try:
            records = [
                _new_message(recipient, stored, summary, sender, received, enforce_quota,
                             event)
                for recipient, stored, event in zip(local, files, outboxed, strict=True)
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
            remove_files([f.path for f in files] + ([spooled.path] if spooled else []))
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
            remove_files([f.path for f in files] + ([spooled.path] if spooled else []))
            raise
        return stored, queued

    def _write_files(
        self, message: bytes, local: Sequence[LocalRecipient], spool: bool
    ) -> tuple[list[StoredFile], StoredFile | None]:
        written = deliver_unsynced(self._root, message, [(r.maildir, r.folder) for r in local])
        try:
            for directory in {f.path.parent for f in written}:
                fsync_directory(directory)
            spooled = self._spool.deliver(message) if spool else None
        except BaseException:
            remove_files([f.path for f in written])
            raise
        return written, spooled


def _new_message(
    recipient: LocalRecipient,
    stored: StoredFile | None,  # None: the writer fills in the file (name and size)
    summary: MessageSummary,
    sender: str,
    received: datetime,
    enforce_quota: bool,
    event: dict[str, Any] | None = None,
) -> NewMessage:
    flags = {f.lower() for f in recipient.flags}
    return NewMessage(
        mailbox_id=None,
        mailbox=recipient.mailbox,
        user_id=recipient.user_id,
        filename=stored.name if stored else "",
        size=stored.size if stored else 0,
        internal_date=received,
        envelope_from=sender,
        envelope_to=(recipient.address,),
        summary=summary,
        keywords=recipient.keywords,
        seen="\\seen" in flags,
        answered="\\answered" in flags,
        flagged="\\flagged" in flags,
        deleted="\\deleted" in flags,
        draft="\\draft" in flags,
        enforce_quota=enforce_quota,
        event=event,
    )
