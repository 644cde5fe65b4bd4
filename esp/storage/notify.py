"""Mailbox change notifications from PostgreSQL (LISTEN/NOTIFY), pushed to the reactor.

Every change to a mailbox (a delivery, a flag change, an expunge) sends ``pg_notify`` on
:data:`esp.storage.mailstore.MAILBOX_CHANNEL` at commit, whichever node made it.  One
listening connection per process, watched by the reactor (no thread, no polling loop), hands
each notification to the subscribers of that mailbox: IDLE sessions learn of new mail within
a round trip of the commit.  A lost connection is reopened with backoff; subscribers are told
(with ``None``) so they can look for changes they may have missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esp.storage.mailstore import MAILBOX_CHANNEL

Subscriber = Callable[[int | None], None]


@implementer(IReadDescriptor)
class MailboxNotifier(Service):
    """LISTENs on the mailbox channel and calls ``subscriber(mailbox_id)`` per change."""

    log = Logger()

    def __init__(self, dsn: str, reactor: Any) -> None:
        self.setName("mailbox-notifier")
        self._dsn = dsn
        self._reactor = reactor
        self._subscribers: dict[int, set[Subscriber]] = {}
        self._connection: Any = None
        self._fd = -1
        self._retry: Any = None
        self._delay = 0.5
        # Other channels: callback per channel, called once per batch of notices (and after
        # a reconnection, for what may have been missed).
        self._channels: dict[str, Callable[[], None]] = {}

    def listen(self, channel: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``channel`` is notified (set up before the start)."""
        self._channels[channel] = callback

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, mailbox_id: int, subscriber: Subscriber) -> None:
        self._subscribers.setdefault(mailbox_id, set()).add(subscriber)

    def unsubscribe(self, mailbox_id: int, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(mailbox_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[mailbox_id]

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._close()

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        try:
            # Bounded: a start-up or reconnection never holds the reactor for long.
            connection = psycopg2.connect(self._dsn, application_name="esp-notify",
                                          connect_timeout=5)
            connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            with connection.cursor() as cur:
                cur.execute(f"LISTEN {MAILBOX_CHANNEL}")
                for channel in self._channels:
                    cur.execute(f"LISTEN {channel}")
        except psycopg2.Error as e:
            self.log.warn("cannot listen for mailbox changes ({error}); retrying in {delay}s",
                          error=str(e).strip(), delay=self._delay)
            self._retry = self._reactor.callLater(self._delay, self._connect)
            self._delay = min(self._delay * 2, 30)
            return
        self._delay = 0.5
        self._connection = connection
        # Our own descriptor: libpq closes its socket when the server goes away.
        self._fd = os.dup(connection.fileno())
        self._reactor.addReader(self)
        self._broadcast_missed()

    def _close(self) -> None:
        if self._fd >= 0:
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._fd = -1
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass
            self._connection = None

    def _broadcast_missed(self) -> None:
        for subscribers in list(self._subscribers.values()):
            for subscriber in list(subscribers):
                self._call(subscriber, None)
        for callback in list(self._channels.values()):
            self._call_channel(callback)

    def _call_channel(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.log.failure("a notification callback failed")

    # -- IReadDescriptor ----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "mailbox-notifier"

    def doRead(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            connection.poll()
        except psycopg2.Error as e:
            self.connectionLost(Failure(e))
            return
        notifies = connection.notifies
        seen: set[int] = set()
        woken: set[str] = set()
        while notifies:
            notice = notifies.pop(0)
            if notice.channel != MAILBOX_CHANNEL:
                woken.add(notice.channel)
                continue
            try:
                mailbox_id = int(notice.payload.split(":", 1)[0])
            except ValueError:
                continue
            if mailbox_id in seen:
                continue
            seen.add(mailbox_id)
            for subscriber in list(self._subscribers.get(mailbox_id, ())):
                self._call(subscriber, mailbox_id)
        for channel in woken:
            callback = self._channels.get(channel)
            if callback is not None:
                self._call_channel(callback)

    def connectionLost(self, reason: Failure) -> None:
        self.log.warn("lost the mailbox notification connection: {reason}",
                      reason=reason.getErrorMessage())
        self._close()
        if self.running and self._retry is None:
            self._retry = self._reactor.callLater(self._delay, self._connect)

    def _call(self, subscriber: Subscriber, mailbox_id: int | None) -> None:
        try:
            subscriber(mailbox_id)
        except Exception:
            self.log.failure("a mailbox change subscriber failed")
