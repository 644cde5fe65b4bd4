"""Two ESP nodes (two `twistd esp` processes on one database and one spool) drain a shared
queue of 1,000 messages to a remote MX: each message goes exactly once and both nodes take
part; then one node is killed mid-run and the other finishes its work: nothing is lost."""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from esp.storage.db import run_sync
from esp.storage.maildir import Maildir
from esp.storage.queue import enqueue_txn, spent_spool_files_txn
from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.helpers import wait_for_logs
from tests.sink import Sink, start_sink

MESSAGES = 1000
# Each node's connections to the one destination: at most this many messages can be under
# way on a node when it is killed.
PER_DESTINATION = 4


@dataclass
class Nodes:
    a: EspServer
    b: EspServer
    sink: Sink
    spool: Path
    dsn: str


def wait_for(condition: Callable[[], bool], what: str, nodes: Nodes) -> None:
    """Wait for ``condition``, checked each time a node logs (every delivery attempt and
    every removal of spool files is logged)."""
    wait_for_logs([nodes.a.process, nodes.b.process], condition, what, timeout=300)


@pytest.fixture
def nodes(scratch: Path, database_dsn: str, test_dns: DNSServer) -> Iterator[Nodes]:
    sink = start_sink(scratch / "sink", "127.0.0.2")
    spool = scratch / "spool"
    outbound = (f"    port: {sink.port}\n    poll_interval: 0.5\n    lease_time: 3\n"
                f"    max_connections: 8\n    max_connections_per_destination: {PER_DESTINATION}\n")
    started = []
    for name in ("a", "b"):
        directory = scratch / name
        directory.mkdir()
        started.append(start_esp(directory, database_dsn, test_dns.nameserver,
                                 outbound=outbound, storage=f"  spool_dir: {spool}\n"))
    yield Nodes(started[0], started[1], sink, spool, database_dsn)
    for node in started:
        node.process.stop()
    sink.stop()


def queue_messages(nodes: Nodes, batch: str) -> None:
    """Spool and queue MESSAGES messages at once, as submission does (file first)."""
    spool = Maildir(nodes.spool)
    spool.create()
    files = []
    for n in range(MESSAGES):
        body = (f"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: {batch}-{n}\r\n"
                f"Message-ID: <{batch}-{n}@example.test>\r\n\r\nmessage {n}\r\n").encode()
        files.append(spool.deliver(body))
    conn = psycopg2.connect(nodes.dsn)
    try:
        def txn(cur: psycopg2.extensions.cursor) -> None:
            for stored in files:
                enqueue_txn(cur, stored.name, "alice@example.test", ["bob@remote.test"],
                            stored.size)
        run_sync(conn, txn)
    finally:
        conn.close()


def received(sink: Sink, batch: str) -> Counter[str]:
    return Counter(m.group(1).decode() for message in sink.messages()
                   if (m := re.search(rb"\r\nSubject: (" + batch.encode() + rb"-\d+)\r\n",
                                      message)))


def spooled(nodes: Nodes) -> list[str]:
    return [p.name for p in (nodes.spool / "new").iterdir()]


def pending(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM queue WHERE status <> 'sent'")
        row = cur.fetchone()
        return int(row[0]) if row else -1


def test_two_nodes_share_the_queue_and_a_killed_one_loses_nothing(nodes: Nodes) -> None:
    queue_messages(nodes, "first")
    # Done when every row is sent and every spool file went with its mail.
    wait_for(lambda: pending(nodes.dsn) == 0 and spooled(nodes) == [],
             "draining the first batch", nodes)
    first = received(nodes.sink, "first")
    assert len(first) == MESSAGES, "some messages never arrived"
    assert first.most_common(1)[0][1] == 1, "a message was sent twice"
    # Both nodes took part (each logs the messages it sent).
    nodes.a.process.wait_for(" sent via mx.remote.test")
    nodes.b.process.wait_for(" sent via mx.remote.test")

    queue_messages(nodes, "second")
    wait_for(lambda: len(received(nodes.sink, "second")) >= MESSAGES // 4, "a quarter sent", nodes)
    nodes.a.process.stop(signal.SIGKILL)
    wait_for(lambda: pending(nodes.dsn) == 0, "node b finishing the second batch", nodes)
    second = received(nodes.sink, "second")
    assert len(second) == MESSAGES, "a message was lost with the killed node"
    # What the killed node had sent but not yet recorded goes again (RFC 5321 §6.1: a
    # duplicate rather than a loss); nothing else does.
    duplicates = sum(count - 1 for count in second.values())
    assert duplicates <= PER_DESTINATION, f"{duplicates} duplicates"
    # The killed node may have left files of messages it had recorded as sent: the spool
    # sweep (any node, hourly) knows them as spent.
    left = spooled(nodes)
    conn = psycopg2.connect(nodes.dsn)
    try:
        assert sorted(run_sync(conn, spent_spool_files_txn, left)) == sorted(left)
    finally:
        conn.close()
