"""ESP's ESMTP client against scripted servers over loopback sockets: replies it must not trust
(text injected after the STARTTLS reply, multi-line replies with mixed codes, a 250 where 354
was due), STARTTLS with a real TLS handshake, and dot-stuffing with every kind of line end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from esp.config import TLSConfig
from esp.outbound import transaction_outcomes
from esp.smtp.client import (
    SMTPClientProtocol,
    SMTPConnectionError,
    connect,
    encode_data,
    opportunistic_tls,
)
from esp.tls import CertificateStore


@dataclass
class Scenario:
    """How the server answers: ``replies`` maps a command verb to the raw bytes it sends."""

    extensions: list[str] = field(default_factory=lambda: ["PIPELINING", "SIZE 1000000"])
    replies: dict[bytes, bytes] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)
    tls_options: object = None
    # A broken STARTTLS: 220, then the connection closes where the handshake should be.
    break_tls: bool = False


class ScriptedServer(LineOnlyReceiver):
    delimiter = b"\r\n"

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.in_data = False
        self.tls = False

    def connectionMade(self) -> None:
        self.transport.write(b"220 scripted.test ESMTP\r\n")

    def lineReceived(self, line: bytes) -> None:
        self.scenario.received.append(line)
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.transport.write(self.scenario.replies.get(b".", b"250 2.0.0 Ok\r\n"))
            return
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"STARTTLS" and self.scenario.break_tls:
            self.transport.write(b"220 go ahead\r\n")
            self.transport.loseConnection()
            return
        if verb in self.scenario.replies:
            self.transport.write(self.scenario.replies[verb])
            if verb == b"DATA" and self.scenario.replies[verb].startswith(b"354"):
                self.in_data = True
            return
        if verb == b"EHLO":
            lines = [b"scripted.test"] + [e.encode() for e in self.scenario.extensions]
            if self.scenario.tls_options is not None and not self.tls:
                lines.append(b"STARTTLS")
            self.transport.write(b"".join(
                b"250" + (b" " if i == len(lines) - 1 else b"-") + text + b"\r\n"
                for i, text in enumerate(lines)))
        elif verb == b"STARTTLS":
            self.transport.write(b"220 2.0.0 Ready to start TLS\r\n")
            self.transport.startTLS(self.scenario.tls_options)
            self.tls = True
        elif verb == b"DATA":
            self.in_data = True
            self.transport.write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.loseConnection()
        else:
            self.transport.write(b"250 2.0.0 Ok\r\n")


@dataclass
class Listening:
    scenario: Scenario
    port: int


Listen = Callable[[Scenario], Listening]


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[Listen]:
    ports = []

    def listen(scenario: Scenario) -> Listening:
        factory = Factory.forProtocol(lambda: ScriptedServer(scenario))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return Listening(scenario, port.getHost().port)

    yield listen
    for port in ports:
        await port.stopListening()


async def session(listening: Listening) -> SMTPClientProtocol:
    protocol = await connect(reactor, "127.0.0.1", listening.port, 5, 5, 5)
    assert (await protocol.greeting()).code == 220
    assert (await protocol.ehlo("client.test")).code == 250
    return protocol


@pytest_twisted.ensureDeferred
async def test_replies_injected_behind_the_starttls_reply_are_refused(server: Listen) -> None:
    listening = server(Scenario(extensions=["STARTTLS"], replies={
        b"STARTTLS": b"220 go ahead\r\n250-injected.test\r\n250 AUTH PLAIN\r\n"}))
    protocol = await session(listening)
    with pytest.raises(SMTPConnectionError, match="after the STARTTLS reply"):
        await protocol.starttls(opportunistic_tls(), "client.test")


@pytest_twisted.ensureDeferred
async def test_a_partial_line_behind_the_starttls_reply_is_refused(server: Listen) -> None:
    listening = server(Scenario(extensions=["STARTTLS"], replies={
        b"STARTTLS": b"220 go ahead\r\n250-inj"}))
    protocol = await session(listening)
    with pytest.raises(SMTPConnectionError):
        await protocol.starttls(opportunistic_tls(), "client.test")


@pytest_twisted.ensureDeferred
async def test_starttls_handshakes_and_forgets_what_it_learnt_in_plain_text(
    server: Listen, scratch: Path,
) -> None:
    store = CertificateStore(TLSConfig(), "scripted.test", scratch)
    store.load()
    listening = server(Scenario(extensions=["PIPELINING"], tls_options=store.context_factory()))
    protocol = await session(listening)
    assert "STARTTLS" in protocol.extensions
    reply = await protocol.starttls(opportunistic_tls(), "client.test")
    assert reply.code == 250 and protocol.tls
    assert "STARTTLS" not in protocol.extensions  # the EHLO inside TLS
    result = await protocol.transaction("a@client.test", ["b@scripted.test"],
                                        b"Subject: x\r\n\r\nbody\r\n")
    assert result.complete and result.data is not None and result.data.code == 250
    assert listening.scenario.received.count(b"EHLO client.test") == 2


@pytest_twisted.ensureDeferred
async def test_a_multiline_reply_with_mixed_codes_breaks_the_session(server: Listen) -> None:
    listening = server(Scenario(replies={b"MAIL": b"250-fine\r\n550 not fine\r\n"}))
    protocol = await session(listening)
    with pytest.raises(SMTPConnectionError, match="not an SMTP reply"):
        await protocol.transaction("a@client.test", ["b@scripted.test"], b"x\r\n")


@pytest_twisted.ensureDeferred
async def test_a_250_where_354_was_due_is_not_taken_for_delivery(server: Listen) -> None:
    for extensions in (["PIPELINING"], []):  # pipelined and one command at a time
        listening = server(Scenario(extensions=extensions, replies={b"DATA": b"250 sure\r\n"}))
        protocol = await session(listening)
        result = await protocol.transaction("a@client.test", ["b@scripted.test"], b"x\r\n")
        assert not result.complete
        [(address, outcome)] = transaction_outcomes(["b@scripted.test"], result,
                                                    "scripted.test").items()
        assert outcome.status == "deferred"


@pytest_twisted.ensureDeferred
async def test_recipients_refused_one_by_one_without_pipelining(server: Listen) -> None:
    listening = server(Scenario(extensions=[], replies={
        b"RCPT": b"550 5.1.1 no such user\r\n"}))
    protocol = await session(listening)
    result = await protocol.transaction("a@client.test", ["b@scripted.test", "c@scripted.test"],
                                        b"x\r\n")
    outcomes = transaction_outcomes(["b@scripted.test", "c@scripted.test"], result, "s.test")
    assert {o.status for o in outcomes.values()} == {"bounced"}
    assert all(o.hard for o in outcomes.values())  # an address refusal: suppressed
    assert b"DATA" not in listening.scenario.received  # nothing accepted: no DATA
    assert (await protocol.reset()).code == 250


def test_data_is_dot_stuffed_and_every_line_end_becomes_crlf() -> None:
    assert encode_data(b".one\r\ntwo\n.three\rfour") == (
        b"..one\r\ntwo\r\n..three\r\nfour\r\n.\r\n")
    assert encode_data(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"
