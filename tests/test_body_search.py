"""SEARCH BODY / TEXT through PostgreSQL full-text search (sql/008, esp.storage.bodyindex).

The text is the body as a reader sees it (decoded base64 and quoted-printable, charsets, HTML
without tags), so these tests use messages whose Maildir files do not hold the searched words
as plain bytes: a search that scanned the files would not find them.  Messages are stored by
the real delivery path (Maildir files, real PostgreSQL), and searched through MailboxStore.
"""

from __future__ import annotations

import base64
import quopri
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from esp.addresses import parse_address
from esp.bodytext import MAX_TEXT, body_text, html_text
from esp.delivery import LocalDelivery, LocalRecipient
from esp.events import EventBus
from esp.indexer import BodyIndexer
from esp.storage import directory
from esp.storage.db import Database, connect, run_sync
from esp.storage.mailboxes import MailboxStore
from esp.storage.mailsearch import Criterion

# -- the text of a message ------------------------------------------------------------------------


def mime(*parts: bytes, boundary: str = "b1") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return (b"From: a@remote.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=" + boundary.encode() + b"\r\n\r\n"
            + body + b"--" + boundary.encode() + b"--\r\n")


def b64_part(text: str, kind: str = "text/plain", charset: str = "utf-8") -> bytes:
    return (f"Content-Type: {kind}; charset={charset}\r\nContent-Transfer-Encoding: base64"
            "\r\n\r\n").encode() + base64.encodebytes(text.encode(charset)).replace(b"\n", b"\r\n")


def test_text_is_decoded_from_its_transfer_encoding_and_charset() -> None:
    latin = (b"Content-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: quoted-printable\r\n\r\n") + quopri.encodestring(
        "Grüße aus Köln".encode("iso-8859-1"))
    text = body_text(mime(b64_part("the zebra crossing"), latin))
    assert "the zebra crossing" in text
    assert "Grüße aus Köln" in text


def test_html_keeps_its_words_and_drops_tags_scripts_and_styles() -> None:
    html = ("<html><head><title>t</title><style>p {color: red}</style></head><body>"
            "<p>Quarterly <b>figures</b>&nbsp;attached</p><script>var secret=1;</script>"
            "</body></html>")
    assert html_text(html) == "Quarterly figures attached"
    assert html_text("<p>one</p><p>two<br>three</p>x<b>y</b>z") == "one two three xyz"
    text = body_text(mime(b64_part(html, "text/html")))
    assert "figures" in text and "secret" not in text and "color" not in text


def test_attachment_names_and_attached_messages_are_searchable() -> None:
    attachment = (b'Content-Type: application/pdf; name="budget-2027.pdf"\r\n'
                  b'Content-Disposition: attachment; filename="budget-2027.pdf"\r\n'
                  b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n")
    inner = b"Subject: inner\r\n\r\nforwarded walrus\r\n"
    forwarded = b"Content-Type: message/rfc822\r\n\r\n" + inner
    text = body_text(mime(attachment, forwarded))
    assert "budget-2027.pdf" in text and "forwarded walrus" in text
    assert "JVBERi" not in text  # binary attachments are not text


def test_broken_mime_gives_what_can_be_read() -> None:
    broken = (b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64 at all\xff\r\n")
    unterminated = (b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
                    b"Content-Type: text/plain\r\n\r\nstill readable\r\n")
    assert isinstance(body_text(mime(broken)), str)
    assert "still readable" in body_text(unterminated)
    assert body_text(b"") == "" and body_text(b"\x00\xff\r\n\r\n\xfe") is not None
    assert len(body_text(b"Subject: big\r\n\r\n" + b"word " * 100_000)) == MAX_TEXT


# -- the index and the search, on real storage ----------------------------------------------------


@dataclass
class Mailroom:
    delivery: LocalDelivery
    store: MailboxStore
    db: Database
    dsn: str
    alice: LocalRecipient
    mailbox_id: int
    root: Path

    async def deliver(self, message: bytes) -> int:
        result = await self.delivery.deliver(message, "a@remote.test", [self.alice])
        return result.stored[0].uid

    async def search(self, criterion: Criterion) -> list[int]:
        return await self.store.search(self.alice.maildir, self.mailbox_id, criterion)

    def unindexed(self) -> int:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM messages WHERE body_tsv IS NULL")
            row = cur.fetchone()
            assert row is not None
            return int(row[0])


@pytest_twisted.async_yield_fixture
async def mailroom(database_dsn: str, scratch: Path) -> AsyncIterator[Mailroom]:
    root = scratch / "maildir"
    conn = connect(database_dsn)
    run_sync(conn, directory.add_domain_txn, "example.test")
    user = run_sync(conn, directory.add_user_txn, parse_address("alice@example.test"), "x", root)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM mailboxes WHERE user_id = %s AND name = 'INBOX'", (user.id,))
        row = cur.fetchone()
        assert row is not None
    conn.close()
    disk = ThreadPool(1, 2, "test-disk")
    disk.start()
    db = Database(database_dsn, reactor)
    db.open()
    delivery = LocalDelivery(db, root, scratch / "spool", disk, EventBus(), reactor, database_dsn)
    delivery.prepare()
    store = MailboxStore(db, root, disk, reactor)
    alice = LocalRecipient(user.id, user.address, user.maildir)
    yield Mailroom(delivery, store, db, database_dsn, alice, row[0], root)
    await delivery.close()
    db.close()
    disk.stop()


def plain(subject: str, body: str) -> bytes:
    return (f"From: a@remote.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ).encode() + base64.encodebytes(body.encode()).replace(b"\n", b"\r\n")


@pytest_twisted.ensureDeferred
async def test_body_search_finds_decoded_words_phrases_and_word_starts(mailroom: Mailroom) -> None:
    zebra = await mailroom.deliver(plain("animals", "The Zebra crossing at Köln, near the zoo."))
    html = await mailroom.deliver(mime(b64_part(
        "<p>Meeting <i>moved</i> to Thursday</p><script>zebra()</script>", "text/html")))
    other = await mailroom.deliver(plain("zebra", "nothing to see"))
    assert mailroom.unindexed() == 3  # delivery does not wait for the index

    assert await mailroom.search(("body", "zebra")) == [zebra]  # not the subject, not a script
    assert await mailroom.search(("body", "ZEBRA CROSSING")) == [zebra]  # a phrase, any case
    assert await mailroom.search(("body", "crossing zebra")) == []  # in order
    assert await mailroom.search(("body", "köln")) == [zebra]
    assert await mailroom.search(("body", "thurs")) == [html]  # the start of a word
    assert await mailroom.search(("body", "meeting moved")) == [html]  # across HTML tags
    assert await mailroom.search(("text", "zebra")) == [zebra, other]  # TEXT: headers too
    assert await mailroom.search(("not", ("body", "zebra"))) == [html, other]
    assert await mailroom.search(("or", ("body", "zoo"), ("body", "thursday"))) == [zebra, html]
    assert await mailroom.search(("body", "")) == [zebra, html, other]
    # Quotes, backslashes and tsquery operators are words to look for, not syntax.
    assert await mailroom.search(("body", "it's a \\ & | ! <-> (zoo:*")) == []
    assert await mailroom.search(("body", "!!!")) == []
    assert mailroom.unindexed() == 0  # the first search indexed what was waiting


@pytest_twisted.ensureDeferred
async def test_a_message_stored_after_the_last_search_is_found(mailroom: Mailroom) -> None:
    first = await mailroom.deliver(plain("one", "a walrus"))
    assert await mailroom.search(("body", "walrus")) == [first]
    second = await mailroom.deliver(plain("two", "another walrus"))
    assert await mailroom.search(("body", "walrus")) == [first, second]


@pytest_twisted.ensureDeferred
async def test_the_background_indexer_indexes_in_batches_and_skips_unreadable_files(
    mailroom: Mailroom,
) -> None:
    uids = [await mailroom.deliver(plain(f"m{n}", f"message number{n}")) for n in range(5)]
    # A file that has gone: indexed as having no text, not tried again on every pass.
    with psycopg2.connect(mailroom.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT filename FROM messages WHERE uid = %s", (uids[0],))
        found = cur.fetchone()
        assert found is not None
    gone = list(mailroom.root.rglob(found[0] + "*"))
    assert len(gone) == 1
    gone[0].unlink()

    indexer = BodyIndexer(mailroom.store, reactor, interval=3600, batch=2)
    assert [await indexer.run_once() for _ in range(4)] == [2, 2, 1, 0]
    assert indexer.indexed == 5 and mailroom.unindexed() == 0
    with psycopg2.connect(mailroom.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT uid, body_tsv = ''::tsvector FROM messages ORDER BY uid")
        assert cur.fetchall() == [(uid, uid == uids[0]) for uid in uids]
    assert await mailroom.search(("body", "number3")) == [uids[3]]


@pytest_twisted.ensureDeferred
async def test_the_background_indexer_gives_way_while_mail_arrives(mailroom: Mailroom) -> None:
    """While the process stores mail, one batch per interval; once a pass finds no new
    delivery, batch after batch until the backlog is gone."""
    clock = Clock()
    indexer = BodyIndexer(mailroom.store, clock, interval=10, batch=2,
                          activity=lambda: mailroom.delivery.stored)
    indexer.startService()
    try:
        for n in range(7):
            await mailroom.deliver(plain(f"m{n}", f"words{n}"))
        assert mailroom.delivery.stored == 7

        async def tick(seconds: float) -> list[float]:
            """Let ``seconds`` pass and the pass they start finish; when the next is due."""
            clock.advance(seconds)
            running = indexer.current_pass
            assert running is not None
            await running
            return [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()]

        # Mail arrived since the indexer started: one full batch, then the next interval.
        assert await tick(10) == [10]
        assert mailroom.unindexed() == 5
        await mailroom.deliver(plain("m7", "words7"))
        assert await tick(10) == [10]  # still arriving: still one batch per interval
        assert mailroom.unindexed() == 4
        # A quiet interval: the rest at once, batch after batch.
        assert await tick(10) == [0]
        assert await tick(0) == [0]
        assert await tick(0) == [10]  # the last batch was not full: back to the interval
        assert mailroom.unindexed() == 0 and indexer.indexed == 8
    finally:
        indexer.stopService()


def test_a_pass_that_ends_at_once_leaves_no_pass_behind(scratch: Path) -> None:
    """A database that is not open fails the pass before it ever waits: the indexer must not
    then report (or wait at stop for) a pass in progress."""
    clock = Clock()
    closed = Database("dbname=never-opened", reactor)
    disk = ThreadPool(1, 1, "test-disk")
    indexer = BodyIndexer(MailboxStore(closed, scratch, disk, reactor), clock, interval=10)
    indexer.startService()
    clock.advance(10)
    assert indexer.current_pass is None
    assert [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()] == [10]
    assert indexer.stopService() is None and clock.getDelayedCalls() == []


@pytest.mark.parametrize("text, query", [
    ("hello world", "'hello':* <-> 'world':*"),
    ("it's", "'it':* <-> 's':*"),
    ("a\\b", "'a':* <-> 'b':*"),
    ("", None),
    ("!!!", None),
])
def test_the_query_is_built_from_the_words_of_the_text(
    database_dsn: str, text: str, query: str | None,
) -> None:
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT esp_body_query(%s)::text", (text,))
        row = cur.fetchone()
        assert row is not None
        assert row[0] == query
