"""Outbound delivery workers against a real PostgreSQL, the test DNS and Postfix's smtp-sink as
the remote MX: retries on the schedule (driven by a controllable clock), bounces with an RFC
3464 report in the sender's INBOX, suppression, MX fallback, null MX, expiry."""

from __future__ import annotations

import email
import email.message
import email.policy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from esp.addresses import parse_address
from esp.config import OutboundConfig, TLSConfig
from esp.delivery import LocalDelivery
from esp.dns import Resolver
from esp.events import Event, EventBus
from esp.outbound import OutboundService
from esp.storage import directory
from esp.storage.db import Database, connect, run_sync
from esp.storage.directory import DirectoryStore
from esp.storage.queue import Claim, Finished, RecipientOutcome
from esp.tls import CertificateStore
from tests.dnszone import DNSServer
from tests.helpers import assert_event_matches_schema
from tests.sink import Sink, start_sink
from tests.test_smtp_client import Scenario, ScriptedServer


@dataclass
class World:
    service: OutboundService
    db: Database
    clock: Clock
    delivery: LocalDelivery
    dsn: str
    maildir_root: Path
    sender_id: int
    bus: EventBus
    events: list[Event] = field(default_factory=list)
    finished: list[tuple[Claim, Finished, dict[str, RecipientOutcome]]] = field(
        default_factory=list
    )

    async def queue(self, *recipients: str, sender: str = "alice@example.test",
                    subject: str = "hello") -> None:
        message = (f"From: Alice <{sender or 'nobody@example.test'}>\r\nTo: {recipients[0]}\r\n"
                   f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@example.test>"
                   "\r\n\r\nSome text.\r\n.leading dot\r\n").encode()
        await self.delivery.deliver(message, sender, [], recipients,
                                    sender_user_id=self.sender_id)

    async def settle(self) -> None:
        """Run what is due by the test clock (and what that makes due: a bounce report to
        deliver) until the workers are idle with nothing due."""
        for _ in range(20):
            self.clock.advance(0)
            await self.service.when_idle()
            now = self.clock.seconds()
            if not any(call.getTime() <= now for call in self.clock.getDelayedCalls()):
                return
        raise AssertionError("the workers never settled")

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.settle()

    def rows(self) -> list[tuple[str, str, int, float, str | None]]:
        """(address, row status, attempts, seconds until the next attempt by the test clock,
        last error) per queued recipient."""
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT r.address, q.status, q.attempts, "
                "extract(epoch FROM q.next_attempt_at) - %s, r.last_error "
                "FROM queue q JOIN queue_recipients r ON r.queue_id = q.id ORDER BY q.id",
                (self.clock.seconds(),),
            )
            return [(a, s, n, float(w), e) for a, s, n, w, e in cur.fetchall()]

    def inbox(self, localpart: str = "alice") -> list[bytes]:
        new = self.maildir_root / "example.test" / localpart / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def suppressed(self) -> list[tuple[str, str]]:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT address, reason FROM suppressions ORDER BY address")
            return list(cur.fetchall())


@pytest.fixture
def pools() -> Iterator[tuple[ThreadPool, ThreadPool]]:
    disk = ThreadPool(1, 2, "test-disk")
    dns_pool = ThreadPool(1, 2, "test-dns")
    disk.start()
    dns_pool.start()
    yield disk, dns_pool
    disk.stop()
    dns_pool.stop()


@pytest.fixture
def sinks(scratch: Path) -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


MakeWorld = Callable[..., Awaitable[World]]


@pytest_twisted.async_yield_fixture
async def make_world(
    database_dsn: str, scratch: Path, test_dns: DNSServer,
    pools: tuple[ThreadPool, ThreadPool],
) -> AsyncIterator[MakeWorld]:
    made: list[World] = []

    async def make(**settings: Any) -> World:
        root = scratch / "maildir"
        conn = connect(database_dsn)
        run_sync(conn, directory.add_domain_txn, "example.test")
        alice = run_sync(conn, directory.add_user_txn, parse_address("alice@example.test"),
                         "x", root)
        conn.close()
        db = Database(database_dsn, reactor)
        db.open()
        events = EventBus()
        delivery = LocalDelivery(db, root, scratch / "spool", pools[0], events, reactor,
                                 database_dsn)
        delivery.prepare()
        clock = Clock()
        # A little ahead of the database's now(), which stamps queued rows as due.
        clock.advance(time.time() + 5)
        service = OutboundService(
            OutboundConfig(**settings), "mx.example.test", db,
            Resolver((test_dns.nameserver,), 2.0), pools[1], pools[0], scratch / "spool",
            DirectoryStore(db, root), delivery, events, reactor, clock=clock,
        )
        world = World(service, db, clock, delivery, database_dsn, root, alice.id, events)
        events.subscribe("#", lambda event: world.events.append(event))
        service.finished_hooks.append(lambda *args: world.finished.append(args))
        delivery.on_queued = service.wake
        service.startService()
        made.append(world)
        return world

    yield make
    for world in made:
        for event in world.events:
            assert_event_matches_schema(event)  # what docs/schemas/events promises
        await world.service.stopService()
        await world.delivery.close()
        world.db.close()


def report_of(message: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """The DSN's top part and its delivery-status blocks (per-message, then per-recipient)."""
    parsed = email.message_from_bytes(message)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = parsed.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return parsed, blocks


@pytest_twisted.ensureDeferred
async def test_a_temporary_refusal_is_retried_on_schedule_until_the_remote_recovers(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink", options=["-r", "RCPT", "-b", "451 4.3.0 Try again later"])
    sinks.append(sink)
    world = await make_world(port=sink.port, retry_schedule=(60, 300))
    await world.queue("bob@remote.test")
    await world.settle()
    [(address, status, attempts, wait, error)] = world.rows()
    assert (address, status, attempts) == ("bob@remote.test", "queued", 1)
    assert abs(wait - 60) < 0.01 and error is not None and error.startswith("451 4.3.0")
    assert sink.messages() == []

    sink.stop()  # the remote recovers
    sinks.append(sink := start_sink(scratch / "sink", port=sink.port))
    await world.advance(59)  # not due yet: nothing is tried
    assert world.rows()[0][1:3] == ("queued", 1) and sink.messages() == []
    await world.advance(1)
    [(_, status, attempts, _, _)] = world.rows()
    assert (status, attempts) == ("sent", 2)
    [received] = sink.messages()
    assert b"X-Rcpt-Args: <bob@remote.test>" in received
    assert b"\r\n.leading dot\r\n" in received  # dot-stuffed on the wire, restored
    sent = [e for e in world.events if e.type == "message.sent"]
    assert [e.payload["recipients"] for e in sent] == [["bob@remote.test"]]
    # Done: the spool file goes once the outcome's commit is known durable (a commit that
    # waits for the WAL flush, within a second; here at once).
    await world.service.flush_spent()
    assert list((scratch / "spool" / "new").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_permanent_refusal_bounces_to_the_sender_and_suppresses_the_address(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink", options=[
        "-f", "RCPT", "-B", "550 5.1.1 <bob@remote.test>: Recipient address rejected"])
    sinks.append(sink)
    world = await make_world(port=sink.port)
    await world.queue("bob@remote.test", subject="doomed message")
    await world.settle()
    [report] = world.inbox()
    parsed, blocks = report_of(report)
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["To"] == "<alice@example.test>"
    per_message, per_recipient = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@remote.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.remote.test"
    assert per_recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert b"Subject: doomed message" in report  # the original header comes back
    # The report came from the null sender: it can never bounce in turn.
    with psycopg2.connect(world.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT envelope_from FROM messages")
        assert cur.fetchall() == [("",)]
    assert [(a, r[:9]) for a, r in world.suppressed()] == [("bob@remote.test", "550 5.1.1")]
    bounced = [e for e in world.events if e.type == "message.bounced"]
    assert [(e.payload["recipient"], e.payload["status"]) for e in bounced] == [
        ("bob@remote.test", "5.1.1")]
    statuses = sorted(status for _, status, _, _, _ in world.rows())
    assert statuses == ["bounced", "sent"]  # the original, and the report delivered locally


@pytest_twisted.ensureDeferred
async def test_outcome_events_are_written_to_the_outbox_with_the_outcome(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink", options=[
        "-f", "RCPT", "-B", "550 5.1.1 <gone@remote.test>: Recipient address rejected"])
    sinks.append(sink)
    world = await make_world(port=sink.port)

    async def everything() -> Callable[[str, str | None], bool]:
        return lambda event_type, domain: event_type != "message.received"

    world.bus.outbox_filter = everything
    await world.queue("gone@remote.test", subject="one bounce")
    await world.settle()
    published = sorted((str(e.id), e.type, e.payload.get("recipient"))
                       for e in world.events if e.type in ("message.sent", "message.bounced"))
    with psycopg2.connect(world.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, type, payload->>'recipient' FROM event_outbox "
                    "ORDER BY id")
        outbox = sorted(cur.fetchall())
    # The bounce, and the report's local delivery by the queue: each event in the outbox
    # under the id the bus saw, written by the outcome's transaction (nothing else writes
    # these types).
    assert [(t, r) for _, t, r in published] == [("message.bounced", "gone@remote.test"),
                                                 ("message.sent", None)]
    assert outbox == published


@pytest_twisted.ensureDeferred
async def test_a_bounce_of_a_bounce_is_not_reported(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink", options=["-f", "RCPT"])
    sinks.append(sink)
    world = await make_world(port=sink.port)
    await world.queue("bob@remote.test", sender="")
    await world.settle()
    assert [status for _, status, _, _, _ in world.rows()] == ["bounced"]
    assert world.inbox() == [] and world.suppressed() == []


@pytest_twisted.ensureDeferred
async def test_mx_fallback_null_mx_and_an_unreachable_mx(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink")
    sinks.append(sink)
    world = await make_world(port=sink.port, max_queue_time=3600)
    await world.queue("carol@fallback.test")  # first MX refuses connections, second takes it
    await world.queue("dave@down.test")  # the only MX refuses connections
    await world.queue("erin@nullmx.test")  # takes no mail at all
    await world.settle()
    outcome = {a: (s, e) for a, s, _, _, e in world.rows()}
    assert outcome["carol@fallback.test"][0] == "sent"
    assert outcome["dave@down.test"][0] == "queued"
    assert "cannot connect to 127.0.0.3" in (outcome["dave@down.test"][1] or "")
    assert outcome["erin@nullmx.test"][0] == "bounced"
    [received] = sink.messages()
    assert b"<carol@fallback.test>" in received
    [report] = world.inbox()
    _, (_, erin) = report_of(report)
    assert erin["Final-Recipient"] == "rfc822; erin@nullmx.test" and erin["Status"] == "5.1.10"
    assert world.suppressed() == []  # no remote refused it: nothing to suppress

    # dave's message expires: what is still deferred is bounced with its last status.
    await world.advance(3600 + 60)
    # Maildir names do not sort by arrival within a second: find the report by recipient.
    reports = [report_of(message)[1][1] for message in world.inbox()]
    assert len(reports) == 2
    [dave] = [r for r in reports if r["Final-Recipient"] == "rfc822; dave@down.test"]
    assert dave["Status"] == "4.4.1" and dave["Action"] == "failed"


@pytest_twisted.ensureDeferred
async def test_the_spool_sweep_removes_only_files_no_queue_entry_needs(
    make_world: MakeWorld, scratch: Path,
) -> None:
    world = await make_world(port=9, poll_interval=3600)  # nothing is delivered meanwhile
    await world.queue("bob@remote.test")
    spool = scratch / "spool" / "new"
    [needed] = list(spool.iterdir())
    orphan = spool / "1.M1P1.orphan,S=5"  # a node died after recording, before removing it
    orphan.write_bytes(b"hello")
    assert await world.service.sweep_spool(min_age=3600) == []  # both too young to judge
    assert await world.service.sweep_spool(min_age=0) == [orphan.name]
    assert list(spool.iterdir()) == [needed]


@pytest_twisted.ensureDeferred
async def test_a_refusal_that_says_nothing_about_the_address_bounces_without_suppressing(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink", options=[
        "-f", "RCPT", "-B", "550 5.7.1 Service unavailable; client host blocked"])
    sinks.append(sink)
    world = await make_world(port=sink.port)
    await world.queue("bob@remote.test")
    await world.settle()
    [report] = world.inbox()
    _, (_, bob) = report_of(report)
    assert bob["Status"] == "5.7.1"
    assert world.suppressed() == []  # our IP was refused, not bob's address


@pytest_twisted.ensureDeferred
async def test_many_recipients_go_fifty_per_transaction(
    make_world: MakeWorld, sinks: list[Sink], scratch: Path,
) -> None:
    sink = start_sink(scratch / "sink")
    sinks.append(sink)
    world = await make_world(port=sink.port)
    recipients = [f"user{n}@remote.test" for n in range(60)]
    await world.queue(*recipients)
    await world.settle()
    assert {status for _, status, _, _, _ in world.rows()} == {"sent"}
    assert len(sink.messages()) == 2  # smtp-sink dumps one file per transaction


@dataclass
class TLSMX:
    """A remote MX on 127.0.0.2 that offers STARTTLS (the scripted server of
    test_smtp_client) and notes what each connection did."""

    port: Any
    sessions: list[ScriptedServer]


def start_tls_mx(scratch: Path, break_handshake: bool = False) -> TLSMX:
    store = CertificateStore(TLSConfig(), "mx.remote.test", scratch / "remote-tls")
    store.load()
    scenario = Scenario(extensions=["PIPELINING", "8BITMIME"],
                        tls_options=store.context_factory())
    # Says yes to STARTTLS, then hangs up where the handshake should be.
    scenario.break_tls = break_handshake
    sessions: list[ScriptedServer] = []

    def build() -> ScriptedServer:
        server = ScriptedServer(scenario)
        sessions.append(server)
        return server

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.2")
    return TLSMX(port, sessions)


@pytest_twisted.ensureDeferred
async def test_starttls_is_used_when_the_mx_offers_it(
    make_world: MakeWorld, scratch: Path,
) -> None:
    mx = start_tls_mx(scratch)
    try:
        world = await make_world(port=mx.port.getHost().port)
        await world.queue("bob@remote.test")
        await world.settle()
        assert [status for _, status, _, _, _ in world.rows()] == ["sent"]
        [session] = mx.sessions
        assert session.tls and session.scenario.received.count(b"EHLO mx.example.test") == 2
        [sent] = [e for e in world.events if e.type == "message.sent"]
        assert sent.payload["tls"] is True
    finally:
        await mx.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_failed_tls_handshake_falls_back_to_plain_text(
    make_world: MakeWorld, scratch: Path,
) -> None:
    mx = start_tls_mx(scratch, break_handshake=True)
    try:
        world = await make_world(port=mx.port.getHost().port)
        await world.queue("bob@remote.test")
        await world.settle()
        assert [status for _, status, _, _, _ in world.rows()] == ["sent"]
        first, second = mx.sessions  # the failed handshake, then plain text
        assert b"STARTTLS" in first.scenario.received
        assert not second.tls
        [sent] = [e for e in world.events if e.type == "message.sent"]
        assert sent.payload["tls"] is False
    finally:
        await mx.port.stopListening()
