"""The ESMTP state machine without sockets (StringTransport, task.Clock).

Where our server fixes a flaw of Twisted's own ``ESMTP``, the same scenario also runs against the
unmodified base class and is expected to fail there (``xfail(strict=True)``): each test proves
both the flaw and the fix.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer

from esp.envelope import Accepted, Envelope, Listener, Refusal, Session
from esp.events import EventBus
from esp.limits import ConnectionLimits
from esp.smtp.server import ESMTPServer, SMTPSettings


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_started = False

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started = True


def without_received(message: bytes) -> bytes:
    """The message minus our Received header, to compare both servers on the client's bytes."""
    assert message.startswith(b"Received: ")
    end = 0
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end : end + 1] not in (b" ", b"\t"):
            return message[end:]


class RecordingPolicy:
    """Mail logic's stand-in: accepts example.test recipients and records messages."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.sender_gate: defer.Deferred[None] | None = None

    async def check_sender(self, session: Session, sender: str, size: int | None) -> None:
        if self.sender_gate is not None:
            await self.sender_gate

    async def check_recipient(
        self, session: Session, rcpt: str, size: int | None, sender: str = ""
    ) -> Accepted:
        if not rcpt.endswith("@example.test"):
            raise Refusal(554, "5.7.1", "Relay access denied")
        return Accepted(rcpt)

    async def receive(self, session: Session, envelope: Envelope, accepted: list[Accepted],
                      message: bytes) -> str:
        self.messages.append(without_received(message))
        return "id"


@implementer(IMessageDelivery)
class BaseDelivery:
    """The same recording, for Twisted's unmodified ESMTP."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.sender_gate: defer.Deferred[Any] | None = None

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        if self.sender_gate is not None:
            return self.sender_gate.addCallback(lambda _: origin)
        return origin

    def validateTo(self, user: Any) -> Callable[[], Any]:
        messages = self.messages

        @implementer(IMessageSMTP)
        class Message:
            def __init__(self) -> None:
                self.lines: list[bytes] = []

            def lineReceived(self, line: bytes) -> None:
                self.lines.append(line)

            def eomReceived(self) -> defer.Deferred[None]:
                messages.append(b"\r\n".join(self.lines) + b"\r\n")
                return defer.succeed(None)

            def connectionLost(self) -> None:
                pass

        return Message


@dataclass
class Harness:
    protocol: Any
    transport: TLSStringTransport
    store: Any
    clock: task.Clock = field(default_factory=task.Clock)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()

    @property
    def messages(self) -> list[bytes]:
        return list(self.store.messages)

    def open_sender_gate(self) -> None:
        self.store.sender_gate = defer.Deferred()

    def release_sender(self) -> None:
        gate, self.store.sender_gate = self.store.sender_gate, None
        gate.callback(None)


def ours(listener: Listener = Listener.MX, checker: Any = None, **settings: Any) -> Harness:
    clock = task.Clock()
    policy = RecordingPolicy()
    protocol = ESMTPServer(
        SMTPSettings("mx.example.test", listener, settings.pop("max_message_size", 100_000),
                     settings.pop("max_recipients", 10), **settings),
        policy, checker, object(), ConnectionLimits(clock.seconds, 0, 0, 5), EventBus(), clock,
    )
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    return Harness(protocol, transport, policy, clock)


def base() -> Harness:
    delivery = BaseDelivery()
    protocol = smtp.ESMTP(contextFactory=object())
    protocol.delivery = delivery
    protocol.host = b"mx.example.test"
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    protocol.setTimeout(None)
    return Harness(protocol, transport, delivery)


BOTH = [
    pytest.param(ours, id="esp"),
    pytest.param(base, id="twisted-unmodified", marks=pytest.mark.xfail(strict=True)),
]
START = b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
SMUGGLED = (
    b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"
)


def no_smuggled_message(messages: list[bytes]) -> None:
    assert not any(m.startswith(b"Subject: smuggled") for m in messages)
    for m in messages:  # nothing stored may carry a bare CR or LF
        assert m.count(b"\n") == m.count(b"\r\n") == m.count(b"\r")


@pytest.mark.parametrize("server", BOTH)
@pytest.mark.parametrize("trick", [b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\n.\n"])
def test_fake_end_of_data_does_not_end_the_message(
    server: Callable[[], Harness], trick: bytes
) -> None:
    h = server()
    h.send(START + b"Subject: first\r\n\r\nfirst" + trick + SMUGGLED)
    no_smuggled_message(h.messages)
    assert len(h.messages) <= 1


@pytest.mark.parametrize("server", BOTH)
def test_bare_lf_message_is_refused_whole(server: Callable[[], Harness]) -> None:
    h = server()
    h.send(START + b"Subject: x\r\n\r\nline one\nline two\r\n.\r\n")
    assert h.messages == []
    assert b"550 5.6.0" in h.output()


@pytest.mark.parametrize("server", BOTH)
def test_a_20000_byte_line_stays_message_content(server: Callable[[], Harness]) -> None:
    h = server()
    h.send(START + b"Subject: long\r\n\r\n" + b"a" * 20_000 + b"\r\n" + SMUGGLED)
    assert len(h.messages) == 1
    assert h.messages[0].startswith(b"Subject: long\r\n")
    assert b"a" * 20_000 + b"\r\nMAIL FROM:<evil@remote.test>" in h.messages[0]
    no_smuggled_message(h.messages)


@pytest.mark.parametrize("server", BOTH)
def test_commands_pipelined_behind_starttls_are_discarded(server: Callable[[], Harness]) -> None:
    h = server()
    h.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<a@remote.test>\r\n")
    assert h.transport.tls_started
    after = h.output().split(b"220 ")[-1]
    assert b"Ready to start TLS" in after or b"Begin TLS" in after
    assert b"\r\n250" not in after  # the MAIL sent in clear text was not acted upon
    h.transport.clear()
    h.send(b"MAIL FROM:<a@remote.test>\r\n")  # the session starts over after TLS
    assert h.output().startswith(b"503")


@pytest.mark.parametrize("server", BOTH)
def test_pipelined_rcpt_waits_for_the_answer_to_mail(server: Callable[[], Harness]) -> None:
    h = server()
    h.send(b"EHLO client.test\r\n")
    h.transport.clear()
    h.open_sender_gate()
    h.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    assert h.output() == b""  # nothing answered while the sender check is pending
    h.release_sender()
    replies = h.output().split(b"\r\n")
    assert replies[0].startswith(b"250") and replies[1].startswith(b"250"), replies


@pytest.mark.parametrize("server", BOTH)
def test_extensions_are_advertised(server: Callable[[], Harness]) -> None:
    h = server()
    h.send(b"EHLO client.test\r\n")
    for extension in (b"PIPELINING", b"SIZE ", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"CHUNKING",
                      b"SMTPUTF8", b"STARTTLS"):
        assert extension in h.output()


# -- our server alone -------------------------------------------------------------------------


def replies_to(h: Harness, data: bytes) -> list[bytes]:
    h.transport.clear()
    h.send(data)
    return [line for line in h.output().split(b"\r\n") if line]


def test_dot_stuffing_is_undone() -> None:
    h = ours()
    h.send(START + b"Subject: dots\r\n\r\n..leading dot\r\n.\r\n")
    assert h.messages == [b"Subject: dots\r\n\r\n.leading dot\r\n"]


def test_chunking_bdat_delivers_exact_octets() -> None:
    h = ours()
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    body = b"Subject: bdat\r\n\r\n.no stuffing here\r\n"
    replies = replies_to(h, b"BDAT 10\r\n" + body[:10] + b"BDAT %d LAST\r\n" % (len(body) - 10)
                         + body[10:] + b"NOOP\r\n")
    assert replies[0] == b"250 2.0.0 10 octets received"
    assert replies[1].startswith(b"250 2.0.0 Ok: queued as")
    assert replies[2].startswith(b"250")
    assert h.messages == [body]


def test_bdat_without_a_transaction_is_read_then_refused() -> None:
    h = ours()
    h.send(b"EHLO client.test\r\n")
    replies = replies_to(h, b"BDAT 7 LAST\r\nNOOP\r\nxNOOP\r\n")
    assert replies[0].startswith(b"503")
    assert replies[1].startswith(b"250")  # "NOOP\r\nx" was the chunk; the NOOP after it ran
    assert len(replies) == 2


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"MAIL FROM:<a@remote.test>", b"503 5.5.1"),  # before EHLO
        (b"FROB", b"500 5.5.2"),
        (b"EHLO", b"501 5.5.4"),
        (b"VRFY bob", b"252 2.5.2"),
        (b"EXPN staff", b"502 5.5.1"),
        (b"AUTH PLAIN", b"503 5.5.1"),  # no AUTH on the MX port
        (b"RCPT TO:<bob@example.test>", b"503 5.5.1"),
        (b"DATA", b"503 5.5.1"),
        (b"NOOP", b"250 2.0.0"),
        (b"HELP", b"214"),
        (b"MAIL FROM:<a@remote.test>\x00", b"500 5.5.2"),
    ],
)
def test_commands_out_of_place_get_a_clear_answer(command: bytes, reply: bytes) -> None:
    h = ours()
    assert replies_to(h, command + b"\r\n")[0].startswith(reply)
    assert not h.transport.disconnecting


@pytest.mark.parametrize(
    "argument, reply",
    [
        (b"FROM:<a@remote.test> SIZE=abc", b"501 5.5.4"),
        (b"FROM:<a@remote.test> RET=FULL", b"555 5.5.4"),
        (b"FROM:a@remote.test", b"250"),  # no brackets: tolerated, as deployed servers do
        (b"FROM: <a@remote.test>", b"250"),
        (b"FROM:<>", b"250"),
        (b"FROM:<@relay.test:a@remote.test>", b"250"),  # source route, ignored
        (b"FROM:<no-domain>", b"501 5.1.3"),
        (b"FROM:<a@remote.test", b"501 5.5.4"),
        ("FROM:<jürgen@remote.test>".encode(), b"553 5.6.7"),
        ("FROM:<jürgen@remote.test> SMTPUTF8".encode(), b"250"),
        (b"FROM:<a@remote.test> BODY=BINARYMIME", b"501 5.5.4"),
        (b"TO:<a@remote.test>", b"501 5.5.4"),
    ],
)
def test_mail_from_syntax(argument: bytes, reply: bytes) -> None:
    h = ours()
    h.send(b"EHLO client.test\r\n")
    assert replies_to(h, b"MAIL " + argument + b"\r\n")[0].startswith(reply)


def test_too_many_recipients_is_temporary() -> None:
    h = ours(max_recipients=2)
    h.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\n")
    replies = replies_to(h, b"RCPT TO:<a@example.test>\r\n" * 3)
    assert [r[:3] for r in replies] == [b"250", b"250", b"452"]


def test_relay_refused_by_policy_comes_back_as_554() -> None:
    h = ours()
    h.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\n")
    assert replies_to(h, b"RCPT TO:<x@elsewhere.test>\r\n")[0].startswith(b"554 5.7.1")


def test_an_over_long_command_line_is_refused_and_the_session_goes_on() -> None:
    h = ours()
    replies = replies_to(h, b"NOOP " + b"x" * 10_000 + b"\r\nNOOP\r\n")
    assert replies[0].startswith(b"500 5.5.6")
    assert replies[1].startswith(b"250")


def test_too_many_errors_close_the_session() -> None:
    h = ours(max_errors=3)
    replies = replies_to(h, b"FROB\r\n" * 5)
    assert replies[-1].startswith(b"421 4.7.0")
    assert h.transport.disconnecting


def test_idle_sessions_time_out() -> None:
    h = ours(idle_timeout=300)
    h.clock.advance(299)
    assert not h.transport.disconnecting
    h.transport.clear()
    h.clock.advance(2)
    assert h.output().startswith(b"421 4.4.2")
    assert h.transport.disconnecting


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\x00" + user + b"\x00" + password)


def submission(**settings: Any) -> Harness:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"alice@example.test", b"right password")
    h = ours(Listener.SUBMISSION, checker=checker, **settings)
    h.protocol._tls = True  # as after STARTTLS
    h.send(b"EHLO laptop\r\n")
    return h


def test_auth_plain_and_login() -> None:
    h = submission()
    assert replies_to(h, b"AUTH PLAIN " + plain(b"alice@example.test", b"right password")
                      + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    h = submission()
    replies = replies_to(h, b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@example.test")
                         + b"\r\n" + base64.b64encode(b"right password") + b"\r\n")
    assert replies == [b"334 VXNlcm5hbWU6", b"334 UGFzc3dvcmQ6",
                       b"235 2.7.0 Authentication successful"]


def test_failed_auth_is_answered_slowly_and_more_slowly_each_time() -> None:
    h = submission()
    wrong = b"AUTH PLAIN " + plain(b"alice@example.test", b"wrong") + b"\r\n"
    assert replies_to(h, wrong + b"NOOP\r\n") == []  # no answer yet, and NOOP waits its turn
    h.clock.advance(0.99)
    assert h.output() == b""
    h.clock.advance(0.01)
    assert h.output().startswith(b"535 5.7.8")
    assert b"250 2.0.0" in h.output()  # the queued NOOP ran after the answer
    replies_to(h, wrong)
    h.clock.advance(1.99)
    assert h.output() == b""
    h.clock.advance(0.01)
    assert h.output().startswith(b"535")


def test_too_many_failed_logins_from_one_address_close_the_session() -> None:
    h = submission()
    wrong = b"AUTH PLAIN " + plain(b"alice@example.test", b"wrong") + b"\r\n"
    for _ in range(5):
        h.send(wrong)
        h.clock.advance(60)
    assert b"421 4.7.0" in h.output()
    assert h.transport.disconnecting


def test_auth_refused_before_tls_on_submission() -> None:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    h = ours(Listener.SUBMISSION, checker=checker)
    h.send(b"EHLO laptop\r\n")
    assert b"AUTH" not in h.output()
    assert replies_to(h, b"AUTH PLAIN " + plain(b"a", b"b") + b"\r\n")[0].startswith(
        b"538 5.7.11")
    assert replies_to(h, b"MAIL FROM:<alice@example.test>\r\n")[0].startswith(b"530 5.7.0")


def test_plaintext_auth_on_loopback_only_when_configured() -> None:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"alice@example.test", b"right password")
    h = ours(Listener.SUBMISSION, checker=checker, allow_plaintext_auth=True)
    h.protocol._peer_ip = "127.0.0.1"
    h.send(b"EHLO laptop\r\n")
    assert b"AUTH PLAIN LOGIN" in h.output()
    assert replies_to(h, b"AUTH PLAIN " + plain(b"alice@example.test", b"right password")
                      + b"\r\n")[0].startswith(b"235")


def connect_with(limits: ConnectionLimits, clock: task.Clock) -> tuple[Any, TLSStringTransport]:
    protocol = ESMTPServer(
        SMTPSettings("mx.example.test", Listener.MX, 100_000, 10), RecordingPolicy(), None,
        object(), limits, EventBus(), clock,
    )
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_concurrent_connections_per_address_are_limited() -> None:
    clock = task.Clock()
    limits = ConnectionLimits(clock.seconds, max_per_ip=2, rate_per_minute=0,
                              auth_failures_per_ip=0)
    first, _ = connect_with(limits, clock)
    second, _ = connect_with(limits, clock)
    _, refused = connect_with(limits, clock)
    assert refused.value().startswith(b"421 4.7.0")
    assert refused.disconnecting
    first.connectionLost(None)  # a slot is free again
    _, admitted = connect_with(limits, clock)
    assert admitted.value().startswith(b"220 ")


def test_connection_rate_per_address_is_limited() -> None:
    clock = task.Clock()
    limits = ConnectionLimits(clock.seconds, max_per_ip=0, rate_per_minute=3,
                              auth_failures_per_ip=0)
    for _ in range(3):
        protocol, transport = connect_with(limits, clock)
        assert transport.value().startswith(b"220 ")
        protocol.connectionLost(None)
    _, refused = connect_with(limits, clock)
    assert refused.value().startswith(b"421 4.7.0")
    clock.advance(61)  # the window has passed
    _, admitted = connect_with(limits, clock)
    assert admitted.value().startswith(b"220 ")


@pytest.mark.parametrize("command", [b"BDAT \xc2\xb2", b"MAIL FROM:<a@remote.test> SIZE=\xc2\xb2"])
def test_non_ascii_digits_are_a_syntax_error_not_a_crash(command: bytes) -> None:
    h = ours()
    h.send(b"EHLO c.test\r\n")
    replies = replies_to(h, command + b"\r\nNOOP\r\n")
    assert replies[0].startswith(b"501")
    assert replies[1].startswith(b"250")
    assert not h.transport.disconnecting


def test_data_may_not_follow_bdat() -> None:
    h = ours()
    h.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    replies = replies_to(h, b"BDAT 5\r\nhelloDATA\r\n")
    assert replies[0].startswith(b"250")
    assert replies[1].startswith(b"503 5.5.1")
    assert h.messages == []


def test_auth_with_an_empty_initial_response() -> None:
    h = submission()
    # RFC 4954 §4: "=" is an empty initial response; LOGIN then asks for the user name.
    assert replies_to(h, b"AUTH LOGIN =\r\n") == [b"334 VXNlcm5hbWU6"]
    h = submission()
    assert replies_to(h, b"AUTH PLAIN =\r\n")[0].startswith(b"501")


def test_a_client_that_does_not_read_replies_stops_being_read() -> None:
    h = ours()
    h.protocol.pauseProducing()  # what the transport does when its write buffer is full
    h.transport.clear()
    h.send(b"NOOP\r\n" * 100)
    assert h.output() == b""  # nothing processed (nor buffered as replies) while paused
    assert h.transport.producerState == "producing"  # a little input is still read...
    h.send(b"NOOP\r\n" * 200_000)
    assert h.transport.producerState == "paused"  # ...but not an unbounded amount
    h.protocol.resumeProducing()
    assert h.output().count(b"250 2.0.0 OK") > 100


def test_limit_tables_forget_addresses_once_their_window_has_passed() -> None:
    clock = task.Clock()
    limits = ConnectionLimits(clock.seconds, max_per_ip=0, rate_per_minute=100,
                              auth_failures_per_ip=10)
    for n in range(2000):
        assert limits.admit(f"2001:db8::{n:x}") is None
        limits.release(f"2001:db8::{n:x}")
    clock.advance(601)
    limits.admit("192.0.2.1")  # any later activity sweeps what has expired
    limits._rate.sweep()
    assert len(limits._rate) == 1
    assert len(limits.auth_failures) == 0


def test_the_received_date_is_that_of_the_second_it_is_asked_for() -> None:
    """Formatted once a second: the same second gives the same text, the next one its own."""
    from datetime import UTC, datetime
    from email.utils import format_datetime

    from esp.smtp.server import received_date

    for when in (86_399.2, 86_399.9, 86_400.0, 1_796_000_000.5, 86_399.0):
        assert received_date(when) == format_datetime(datetime.fromtimestamp(int(when), UTC))
    assert received_date(86_400.0) == "Fri, 02 Jan 1970 00:00:00 +0000"
