"""Reactor-driven PostgreSQL connections: they answer, they survive a dropped connection, and a
failed reconnection never leaves callers waiting for ever."""

from __future__ import annotations

import os
import socket

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor

from esp.storage.db import DatabaseUnavailable, Prepared
from esp.storage.pgasync import AsyncDatabase
from tests.helpers import starting_up_first

ADD = Prepared("test_add", "SELECT %(a)s::int + %(b)s::int")
LOCK = Prepared("test_lock", "SELECT pg_advisory_lock(%(key)s::bigint)")
PID = Prepared("test_pid", "SELECT pg_backend_pid()")


@pytest_twisted.ensureDeferred
async def test_statements_run_and_connections_are_reused(database_dsn: str) -> None:
    db = AsyncDatabase(database_dsn, reactor, size=2)
    try:
        assert await db.fetch(ADD, {"a": 2, "b": 3}) == [(5,)]
        first = await db.fetch(PID, {})
        assert await db.fetch(PID, {}) == first  # one idle connection, used again
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await db.fetch(Prepared("test_div", "SELECT 1 / %(z)s::int"), {"z": 0})
        assert await db.fetch(ADD, {"a": 1, "b": 1}) == [(2,)]  # still usable
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_and_a_failed_reconnect_release_their_slot(
    database_dsn: str,
) -> None:
    db = AsyncDatabase(database_dsn, reactor, size=1)
    holder = psycopg2.connect(database_dsn)
    holder.autocommit = True
    try:
        ((pid,),) = await db.fetch(PID, {})
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(7)")
        blocked = db.fetch(LOCK, {"key": 7})  # in flight on the only connection
        waiting = db.fetch(ADD, {"a": 1, "b": 2})  # queued behind it
        db._dsn = "host=/nonexistent dbname=nothing connect_timeout=1"  # PostgreSQL "down"
        with holder.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DatabaseUnavailable):
            await blocked
        with pytest.raises(DatabaseUnavailable, match="cannot connect"):
            await waiting  # told, not left waiting
        db._dsn = database_dsn  # PostgreSQL is back
        assert await db.fetch(ADD, {"a": 2, "b": 2}) == [(4,)]  # the slot was freed
    finally:
        holder.close()
        db.close()


@pytest_twisted.ensureDeferred
async def test_the_socket_libpq_moves_to_while_connecting_is_the_one_watched(
    database_dsn: str
) -> None:
    """With several hosts in the DSN, libpq gives up the first one's socket for the next
    one's: each statement's wait must watch the socket in use, not spin on the old one."""
    server, thread, dsn = starting_up_first(database_dsn)
    db = AsyncDatabase(dsn, reactor, size=1)
    try:
        assert await db.fetch(ADD, {"a": 2, "b": 3}) == [(5,)]
        [connection] = db._idle
        watched = os.fstat(connection.fileno()).st_ino
        assert watched == os.fstat(connection.connection.fileno()).st_ino
        assert await db.fetch(ADD, {"a": 1, "b": 1}) == [(2,)]
    finally:
        db.close()
        server.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        server.close()
        thread.join(10)
    assert not thread.is_alive()
