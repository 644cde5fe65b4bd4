"""A mailbox of 100,000 messages, made through the storage layer (import_messages_txn, in
batches), answers SELECT, SEARCH, FETCH 1:* (FLAGS) and SORT correctly.

Only the index rows are made: none of these commands reads a message body.  Timing is for
bench/, not for tests.
"""

from __future__ import annotations

import imaplib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest

from esp.message import summarize
from esp.storage.db import run_sync
from esp.storage.mailboxes import import_messages_txn
from esp.storage.mailstore import NewMessage
from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp

COUNT = 100_000
BATCH = 10_000
PASSWORD = "big mailbox password"
START = datetime(2020, 1, 1, tzinfo=UTC)


def _message(n: int) -> bytes:
    sender = "boss@corp.test" if n % 1000 == 0 else f"user{n % 97}@list.test"
    return (f"From: {sender}\r\nSubject: message {n}\r\n"
            f"Date: {(START + timedelta(hours=n)).strftime('%a, %d %b %Y %H:%M:%S +0000')}"
            "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("big@example.test", PASSWORD)
    with psycopg2.connect(module_database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE localpart = 'big'")
        row = cur.fetchone()
        assert row is not None
        user_id = row[0]
    conn = psycopg2.connect(module_database_dsn)
    try:
        for first in range(1, COUNT + 1, BATCH):
            batch = [NewMessage(
                mailbox_id=None, mailbox="INBOX", user_id=user_id, filename=f"big{n}",
                size=1000 + n % 5000, internal_date=START + timedelta(hours=n),
                envelope_from="x@list.test", envelope_to=("big@example.test",),
                summary=summarize(_message(n)), seen=n % 3 == 0,
            ) for n in range(first, min(first + BATCH, COUNT + 1))]
            run_sync(conn, import_messages_txn, user_id, "INBOX", batch)
        # Only rows, no files: marked as the body indexer would mark them (no text), so that it
        # does not spend the module finding 100,000 files missing.
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE messages SET body_tsv = ''::tsvector WHERE body_tsv IS NULL")
    finally:
        conn.close()
    yield server
    server.process.stop()


def test_a_mailbox_of_100000_messages(esp: EspServer) -> None:
    client = imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=esp.client_tls(),
                               timeout=300)
    client.login("big@example.test", PASSWORD)
    status, data = client.select("INBOX")
    assert status == "OK" and int(data[0]) == COUNT
    assert client.untagged_responses["UNSEEN"] == [b"1"]

    # Internal dates are START + n hours: SINCE a date finds the messages from that day on.
    status, data = client.uid("SEARCH", "SINCE", "1-Jan-2031")
    since = START + timedelta(days=(datetime(2031, 1, 1, tzinfo=UTC) - START).days)
    first = (since - START) // timedelta(hours=1)
    assert [int(u) for u in data[0].split()] == list(range(first, COUNT + 1))

    status, data = client.search(None, "FROM", "boss@corp.test")
    assert [int(n) for n in data[0].split()] == list(range(1000, COUNT + 1, 1000))

    status, data = client.fetch("1:*", "(FLAGS)")
    assert status == "OK" and len(data) == COUNT
    assert data[2] == b"3 (FLAGS (\\Seen))" and data[3] == b"4 (FLAGS ())"

    status, data = client.uid("SORT", "(REVERSE DATE)", "UTF-8", "ALL")
    assert [int(u) for u in data[0].split()] == list(range(COUNT, 0, -1))
    client.logout()
