"""PostgreSQL on the reactor itself, for the hot single-statement paths (no thread hop).

psycopg2's asynchronous connections are driven by the reactor: the socket is watched for reads
and writes and ``connection.poll()`` advances the protocol.  Such connections are in autocommit
mode, so each statement is its own transaction: this pool serves only operations that are one
statement (one recipient lookup, one stored message), durable when the statement returns
(``synchronous_commit`` is on).  Everything else goes through :class:`esp.storage.db.Database`.

Handing every hot query to a thread pool cost more CPU in GIL hand-offs than the queries
themselves; this is why this module exists.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esp.storage.db import DatabaseUnavailable, Prepared

_OK = psycopg2.extensions.POLL_OK
_READ = psycopg2.extensions.POLL_READ
_WRITE = psycopg2.extensions.POLL_WRITE


def moved_socket(connection: Any, fd: int) -> int | None:
    """While connecting, libpq may give up a socket for another (the next host or address of
    the DSN, another SSL mode): a duplicate of the one ``connection`` uses now if ``fd`` is
    not already one of it, else None.  A reactor left watching the old one would spin on its
    end of stream (and not see the new one's answers)."""
    try:
        current = connection.fileno()
        if os.fstat(current).st_ino == os.fstat(fd).st_ino:
            return None
        return os.dup(current)
    except (OSError, psycopg2.Error):
        return None  # no socket at the moment: the next poll tells


@implementer(IReadDescriptor, IWriteDescriptor)
class _Connection:
    """One asynchronous connection and the reactor registration that drives it."""

    def __init__(self, dsn: str, reactor: Any) -> None:
        self._reactor = reactor
        self._waiting: Deferred[None] | None = None
        self.prepared: set[str] = set()
        self.connection = psycopg2.connect(dsn, async_=1)
        self._connecting = True
        # The reactor watches a duplicate of the socket that we own: libpq closes its own
        # descriptor when the server drops the connection, and unregistering a closed
        # descriptor would fail.
        self._fd = os.dup(self.connection.fileno())

    # -- IReadDescriptor / IWriteDescriptor ------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "postgresql"

    def doRead(self) -> None:
        self._poll()

    def doWrite(self) -> None:
        self._poll()

    def connectionLost(self, reason: Failure) -> None:
        self._finish(reason)

    # -- driving --------------------------------------------------------------------------------

    def wait(self) -> Deferred[None]:
        self._waiting = Deferred()
        d = self._waiting
        self._poll()
        return d

    def _poll(self) -> None:
        if self._waiting is None:
            return
        try:
            state = self.connection.poll()
        except psycopg2.Error as e:
            self._finish(Failure(e))
            return
        if self._connecting:
            self._follow_socket()
        if state == _OK:
            self._connecting = False
            self._finish(None)
        elif state == _READ:
            self._reactor.removeWriter(self)
            self._reactor.addReader(self)
        elif state == _WRITE:
            self._reactor.removeReader(self)
            self._reactor.addWriter(self)

    def _follow_socket(self) -> None:
        moved = moved_socket(self.connection, self._fd)
        if moved is not None:
            self._reactor.removeReader(self)
            self._reactor.removeWriter(self)
            os.close(self._fd)
            self._fd = moved  # registered again below, for what the poll asked

    def _finish(self, failure: Failure | None) -> None:
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        d, self._waiting = self._waiting, None
        if d is None:
            return
        if failure is None:
            d.callback(None)
        else:
            d.errback(failure)

    def close(self) -> None:
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.connection.closed:
            self.connection.close()


class AsyncDatabase:
    """A few asynchronous connections, each running one statement at a time."""

    log = Logger()

    def __init__(self, dsn: str, reactor: Any, size: int = 4) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._size = size
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[Deferred[_Connection]] = deque()
        self._closed = False

    async def _connect(self) -> _Connection:
        try:
            connection = _Connection(self._dsn, self._reactor)
        except psycopg2.Error as e:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {str(e).strip()}") from e
        try:
            await connection.wait()
            cursor = connection.connection.cursor()
            # Bounded: a statement stuck behind a lock or a dead peer must not hold an SMTP
            # session (and a connection of this small pool) for ever.
            cursor.execute("SET TIME ZONE 'UTC'; SET statement_timeout = '60s'")
            await connection.wait()
        except psycopg2.Error as e:
            connection.close()
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {str(e).strip()}") from e
        return connection

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise DatabaseUnavailable("database connections are closed")
        if self._idle:
            return self._idle.pop()
        if self._open < self._size:
            self._open += 1
            try:
                return await self._connect()
            except BaseException:
                self._open -= 1
                raise
        waiter: Deferred[_Connection] = Deferred()
        self._waiters.append(waiter)
        return await waiter

    def _release(self, connection: _Connection | None) -> None:
        if connection is None or self._closed:
            self._open -= 1
            if connection is not None:
                connection.close()
            if self._waiters and not self._closed:
                # A broken connection was dropped: open a new one for the next caller.
                Deferred.fromCoroutine(self._replace(self._waiters.popleft()))
            return
        if self._waiters:
            self._waiters.popleft().callback(connection)
        else:
            self._idle.append(connection)

    async def _replace(self, waiter: Deferred[_Connection]) -> None:
        self._open += 1
        try:
            connection = await self._connect()
        except DatabaseUnavailable as e:
            # The slot is free again, and this caller learns why; the next one tries anew.
            self._open -= 1
            waiter.errback(e)
            return
        waiter.callback(connection)

    async def fetch(self, statement: Prepared, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run one prepared statement in its own transaction; return its rows."""
        connection = await self._acquire()
        try:
            cursor = connection.connection.cursor()
            if statement.name not in connection.prepared:
                cursor.execute(statement.prepare_sql)
                await connection.wait()
                connection.prepared.add(statement.name)
            cursor.execute(statement.execute_sql, params)
            await connection.wait()
            rows = cursor.fetchall() if cursor.description is not None else []
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            connection.close()
            self._release(None)
            raise DatabaseUnavailable(str(e).strip()) from e
        except BaseException:
            # A failed statement leaves an autocommit connection usable.
            self._release(connection)
            raise
        self._release(connection)
        return rows

    def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        while self._waiters:
            self._waiters.popleft().errback(DatabaseUnavailable("database connections closed"))
