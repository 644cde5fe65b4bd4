"""Mailbox change notifications from PostgreSQL (LISTEN/NOTIFY), pushed to the reactor.

Every change to a mailbox (a delivery, a flag change, an expunge) sends ``pg_notify`` on
:data:`esp.storage.mailstore.MAILBOX_CHANNEL` at commit, whichever node made it.  One
listening connection per process, watched by the reactor (no thread, no polling loop), hands
each notification to the subscribers of that mailbox: IDLE sessions learn of new mail within
a round trip of the commit.  A lost connection is reopened with backoff; subscribers are told
(with ``None``) so they can look for changes they may have missed.

The process listens on the mailbox channel only while it has subscribers (IMAP sessions with
a mailbox selected), and for UNLISTEN_AFTER seconds after the last one leaves: a process that
only receives mail (an MX node, or a worker whose connections are all SMTP) is not woken, nor
is a PostgreSQL backend for it, at every delivery's commit.  Subscribers are told ``None``
once a LISTEN they waited for is in effect (a change committed before it was not notified).
The connection is asynchronous, driven by the reactor: the reactor never waits for the server
while connecting, nor for a LISTEN or UNLISTEN (libpq still looks up a host name when the
connection starts, as the blocking connection did).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esp.storage.mailstore import MAILBOX_CHANNEL
from esp.storage.pgasync import moved_socket

Subscriber = Callable[[int | None], None]

# Seconds the mailbox channel stays listened to after its last subscriber left (a session
# going into IDLE, or selecting another mailbox, leaves and comes back at once).
UNLISTEN_AFTER = 60.0
# Seconds a connection attempt may take (libpq does not time out asynchronous connects).
CONNECT_TIMEOUT = 5.0

_OK = psycopg2.extensions.POLL_OK
_READ = psycopg2.extensions.POLL_READ
_WRITE = psycopg2.extensions.POLL_WRITE


@implementer(IReadDescriptor, IWriteDescriptor)
class MailboxNotifier(Service):
    """LISTENs on the mailbox channel and calls ``subscriber(mailbox_id)`` per change."""

    log = Logger()

    def __init__(self, dsn: str, reactor: Any, unlisten_after: float = UNLISTEN_AFTER) -> None:
        self.setName("mailbox-notifier")
        self._dsn = dsn
        self._reactor = reactor
        self._unlisten_after = unlisten_after
        self._subscribers: dict[int, set[Subscriber]] = {}
        self._connection: Any = None
        self._cursor: Any = None
        self._fd = -1
        self._writing = False
        self._retry: Any = None
        self._deadline: Any = None  # of the connection attempt under way
        self._unlisten: Any = None  # the UNLISTEN to come, once the last subscriber left
        self._delay = 0.5
        self._connected = False
        # Statements to send, one at a time, each with what to do once it is done, and the
        # one under way.
        self._statements: deque[tuple[str, Callable[[], None]]] = deque()
        self._running: tuple[str, Callable[[], None]] | None = None
        # Whether the mailbox channel is wanted on this connection (a LISTEN sent or to be
        # sent), and whether that LISTEN is in effect.
        self._mailboxes = False
        self._mailboxes_listened = False
        # Other channels: callback per channel, called once per batch of notices (and after
        # a reconnection, for what may have been missed).
        self._channels: dict[str, Callable[[], None]] = {}

    def listen(self, channel: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``channel`` is notified (set up before the start)."""
        self._channels[channel] = callback

    @property
    def idle(self) -> bool:
        """Whether no statement (LISTEN, UNLISTEN) is under way or waiting."""
        return self._running is None and not self._statements

    @property
    def listening_to_mailboxes(self) -> bool:
        """Whether the LISTEN on the mailbox channel is in effect on a live connection."""
        return self._connected and self._mailboxes_listened

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, mailbox_id: int, subscriber: Subscriber) -> None:
        first = not self._subscribers
        self._subscribers.setdefault(mailbox_id, set()).add(subscriber)
        if first:
            self._want_mailboxes()

    def unsubscribe(self, mailbox_id: int, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(mailbox_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[mailbox_id]
                if not self._subscribers and self._unlisten is None and self.running:
                    self._unlisten = self._reactor.callLater(
                        self._unlisten_after, self._stop_mailboxes)

    def _want_mailboxes(self) -> None:
        if self._unlisten is not None:
            if self._unlisten.active():
                self._unlisten.cancel()
            self._unlisten = None
        if not self._mailboxes and self._connected:
            self._mailboxes = True
            self._send(f"LISTEN {MAILBOX_CHANNEL}", self._mailboxes_in_effect)
        # (Not connected: the connection made next listens, since there are subscribers.)

    def _stop_mailboxes(self) -> None:
        self._unlisten = None
        if not self._subscribers and self._mailboxes and self._connected:
            self._mailboxes = self._mailboxes_listened = False
            self._send(f"UNLISTEN {MAILBOX_CHANNEL}", lambda: None)

    def _mailboxes_in_effect(self) -> None:
        if self._mailboxes:
            self._mailboxes_listened = True
            # Changes committed before this took effect were not notified: look for them.
            self._broadcast_missed(channels=False)

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        for call in (self._retry, self._unlisten):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._unlisten = None
        self._close()

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        try:
            connection = psycopg2.connect(self._dsn, application_name="esp-notify", async_=True)
        except psycopg2.Error as e:
            self._failed(str(e).strip())
            return
        self._connection = connection
        # Our own descriptor: libpq closes its socket when the server goes away.
        self._fd = os.dup(connection.fileno())
        self._reactor.addReader(self)
        self._deadline = self._reactor.callLater(CONNECT_TIMEOUT, self._connect_timed_out)
        self._poll()

    def _connect_timed_out(self) -> None:
        self._deadline = None
        self._lost(f"no connection within {CONNECT_TIMEOUT:g} s")

    def _connected_now(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._connected = True
        self._mailboxes = included = bool(self._subscribers)
        channels = ([MAILBOX_CHANNEL] if included else []) + list(self._channels)
        # One statement; once it is done, everything that may have been missed is looked for.
        self._send("; ".join(f"LISTEN {channel}" for channel in channels) or "SELECT 1",
                   lambda: self._standing_in_effect(included))

    def _standing_in_effect(self, mailboxes: bool) -> None:
        self._delay = 0.5  # a connection that works: the next failure is retried soon
        # (An UNLISTEN may have been queued behind it meanwhile.)
        self._mailboxes_listened = mailboxes and self._mailboxes
        self._broadcast_missed()

    def _send(self, statement: str, done: Callable[[], None]) -> None:
        self._statements.append((statement, done))
        self._next_statement()

    def _next_statement(self) -> None:
        if self._running is not None or not self._statements or self._connection is None:
            return
        self._running = self._statements.popleft()
        try:
            # (psycopg2 wants the cursor of an asynchronous query kept until it is done.)
            self._cursor = self._connection.cursor()
            self._cursor.execute(self._running[0])
        except psycopg2.Error as e:
            self._lost(str(e).strip())
            return
        self._poll()

    def _statement_done(self) -> None:
        assert self._running is not None
        _, done = self._running
        self._running = None
        done()
        self._next_statement()

    def _failed(self, error: str) -> None:
        self.log.warn("cannot listen for mailbox changes ({error}); retrying in {delay}s",
                      error=error, delay=self._delay)
        self._retry = self._reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, 30)

    def _lost(self, error: str) -> None:
        """The connection failed, while connecting or later: another one, after a while."""
        was_connected = self._connected
        self._close()
        if not self.running or self._retry is not None:
            return
        if was_connected:
            self.log.warn("lost the mailbox notification connection: {error}", error=error)
            self._retry = self._reactor.callLater(self._delay, self._connect)
            self._delay = min(self._delay * 2, 30)
        else:
            self._failed(error)

    def _close(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._connected = False
        self._mailboxes_listened = False
        self._statements.clear()
        self._running = None
        if self._fd >= 0:
            self._reactor.removeReader(self)
            if self._writing:
                self._reactor.removeWriter(self)
                self._writing = False
            os.close(self._fd)
            self._fd = -1
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass
            self._connection = None
            self._cursor = None

    def _broadcast_missed(self, channels: bool = True) -> None:
        for subscribers in list(self._subscribers.values()):
            for subscriber in list(subscribers):
                self._call(subscriber, None)
        if channels:
            for callback in list(self._channels.values()):
                self._call_channel(callback)

    def _call_channel(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.log.failure("a notification callback failed")

    # -- IReadDescriptor / IWriteDescriptor -----------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "mailbox-notifier"

    def doRead(self) -> None:
        self._poll()

    def doWrite(self) -> None:
        self._poll()

    def connectionLost(self, reason: Failure) -> None:
        self._lost(reason.getErrorMessage())

    def _poll(self) -> None:
        """Advance the connection (connecting, a statement, notices) as far as it goes."""
        connection = self._connection
        if connection is None:
            return
        try:
            state = connection.poll()
        except psycopg2.Error as e:
            self._lost(str(e).strip())
            return
        if not self._connected:
            self._follow_socket(connection)
        if state == _WRITE:
            if not self._writing:
                self._reactor.addWriter(self)
                self._writing = True
        elif self._writing:
            self._reactor.removeWriter(self)
            self._writing = False
        if state == _OK:
            if not self._connected:
                self._connected_now()
            elif self._running is not None:
                self._statement_done()
        self._dispatch(connection)

    def _follow_socket(self, connection: Any) -> None:
        """Watch the socket libpq uses now (:func:`esp.storage.pgasync.moved_socket`)."""
        moved = moved_socket(connection, self._fd)
        if moved is None:
            return
        self._reactor.removeReader(self)
        if self._writing:
            self._reactor.removeWriter(self)
            self._writing = False
        os.close(self._fd)
        self._fd = moved
        self._reactor.addReader(self)

    def _dispatch(self, connection: Any) -> None:
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

    def _call(self, subscriber: Subscriber, mailbox_id: int | None) -> None:
        try:
            subscriber(mailbox_id)
        except Exception:
            self.log.failure("a mailbox change subscriber failed")
