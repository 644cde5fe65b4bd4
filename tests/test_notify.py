"""Mailbox change notifications: listened to only while this process has subscribers, told
to look for themselves once the LISTEN is in effect, and never blocking the reactor."""

from __future__ import annotations

import os
import socket

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from esp.storage import notify
from esp.storage.mailstore import MAILBOX_CHANNEL
from esp.storage.notify import MailboxNotifier
from tests.helpers import starting_up_first, until


def _notify(dsn: str, channel: str, payload: str) -> None:
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_the_mailbox_channel_is_listened_to_only_while_someone_watches(
    database_dsn: str
) -> None:
    notifier = MailboxNotifier(database_dsn, reactor, unlisten_after=0)
    woken: list[str] = []
    notifier.listen("esp_test_channel", lambda: woken.append("channel"))
    seen: list[int | None] = []
    notifier.startService()
    try:
        await until(lambda: woken == ["channel"])  # connected, standing LISTENs in effect
        assert not notifier.listening_to_mailboxes  # nobody watches a mailbox here

        notifier.subscribe(42, seen.append)
        # Once the LISTEN is in effect, the subscriber looks for what it may have missed.
        await until(lambda: seen == [None])
        assert notifier.listening_to_mailboxes
        _notify(database_dsn, MAILBOX_CHANNEL, "42:7:9")
        _notify(database_dsn, MAILBOX_CHANNEL, "43:1:1")  # another mailbox: not ours
        _notify(database_dsn, "esp_test_channel", "")
        await until(lambda: woken == ["channel", "channel"])
        await until(lambda: seen == [None, 42])

        notifier.unsubscribe(42, seen.append)
        await until(lambda: not notifier.listening_to_mailboxes)  # UNLISTEN after the linger
        await until(lambda: notifier.idle)  # ... and done
        notifier.subscribe(43, seen.append)  # and back: listened to again
        await until(lambda: notifier.listening_to_mailboxes)
        assert seen == [None, 42, None]
    finally:
        notifier.stopService()


@pytest_twisted.ensureDeferred
async def test_subscribers_are_told_to_look_after_a_new_connection(database_dsn: str) -> None:
    notifier = MailboxNotifier(database_dsn, reactor)
    seen: list[int | None] = []
    notifier.subscribe(5, seen.append)  # before the start: the first connection listens
    notifier.startService()
    try:
        await until(lambda: notifier.listening_to_mailboxes)
        assert seen == [None]
        # The server drops the connection: another one, and the subscriber looks again.
        admin = psycopg2.connect(database_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'esp-notify'"
                        " AND datname = current_database()")
        admin.close()
        await until(lambda: len(seen) == 2)
        assert seen == [None, None]
        assert notifier.listening_to_mailboxes
        _notify(database_dsn, MAILBOX_CHANNEL, "5:2:2")
        await until(lambda: seen == [None, None, 5])
    finally:
        notifier.stopService()


@pytest_twisted.ensureDeferred
async def test_the_socket_libpq_moves_to_while_connecting_is_the_one_watched(
    database_dsn: str
) -> None:
    """With several hosts in the DSN, libpq gives up the first one's socket for the next
    one's: the reactor must watch the socket in use, or it spins on the closed one's end
    (and never sees the notices)."""
    server, thread, dsn = starting_up_first(database_dsn)
    notifier = MailboxNotifier(dsn, reactor)
    seen: list[int | None] = []
    notifier.subscribe(8, seen.append)
    notifier.startService()
    try:
        await until(lambda: notifier.listening_to_mailboxes)
        assert notifier._connection is not None
        watched = os.fstat(notifier.fileno()).st_ino
        assert watched == os.fstat(notifier._connection.fileno()).st_ino
        _notify(database_dsn, MAILBOX_CHANNEL, "8:1:1")
        await until(lambda: seen == [None, 8])
    finally:
        notifier.stopService()
        server.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        server.close()
        thread.join(10)
    assert not thread.is_alive()


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_is_given_up_and_tried_again(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is made by the reactor, not waited for: a server that accepts and never
    answers costs the notifier its own deadline, not the reactor's time."""
    monkeypatch.setattr(notify, "CONNECT_TIMEOUT", 0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections wait in the backlog, never answered
    port = silent.getsockname()[1]
    notifier = MailboxNotifier(f"host=127.0.0.1 port={port} dbname=x user=x", reactor)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    clock = LoopingCall(tick)
    clock.start(0.01)
    notifier.startService()
    try:
        await until(lambda: notifier._retry is not None)  # given up at its deadline
        assert ticks > 5  # the reactor ran meanwhile
        assert not notifier.listening_to_mailboxes
    finally:
        clock.stop()
        notifier.stopService()
        silent.close()
    assert notifier._retry is None


@pytest_twisted.ensureDeferred
async def test_a_server_that_cannot_be_reached_is_tried_again(database_dsn: str) -> None:
    notifier = MailboxNotifier("host=127.0.0.1 port=9 dbname=nothing user=nobody", reactor)
    notifier.startService()
    try:
        await until(lambda: notifier._retry is not None)  # no exception, no blocking
        assert not notifier.listening_to_mailboxes
    finally:
        notifier.stopService()
    assert notifier._retry is None
