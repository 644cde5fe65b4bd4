"""An ESMTP client for outbound delivery (RFC 5321), as a Twisted protocol with async methods.

Twisted's own ``SMTPClient`` sends one command at a time, knows no MAIL parameters (SIZE, BODY,
SMTPUTF8) and answers a failed recipient by failing the message; delivery needs each recipient's
own reply, PIPELINING (RFC 2920) and several transactions per connection, so the client is ours.
It knows nothing of queues: :mod:`esp.outbound` decides what a reply means for a recipient.

Every wait for a reply has a time limit (RFC 5321 §4.5.3.2); past it the connection is aborted
and the waiting call raises :class:`SMTPConnectionError`, as it does for a lost connection or a
reply that is not SMTP.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; real servers send longer ones.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as one line, for logs and delivery status notifications."""
        return f"{self.code} {' '.join(line.strip() for line in self.lines)}".strip()

    @property
    def status(self) -> str | None:
        """The enhanced status code (RFC 3463) the reply starts with, if any."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match is None or match.group(1) != str(self.code)[0]:
            return None
        return ".".join(match.groups())

    @property
    def positive(self) -> bool:
        """A completion reply (2xx); an intermediate 3xx is only right where asked for."""
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


class SMTPConnectionError(Exception):
    """The conversation broke off: refused, timed out, lost, TLS failed or not SMTP.  Whatever
    was under way has an unknown outcome and is to be tried again."""


@dataclass(frozen=True)
class TransactionResult:
    """What one mail transaction came to.  ``mail`` refused: nothing else was tried.  A
    recipient's reply in ``recipients`` that is positive still depends on ``data``."""

    mail: Reply
    recipients: tuple[tuple[str, Reply], ...]
    data: Reply | None  # the final reply after the message (or to DATA if that was refused)
    # The message went and its final reply came: the transaction is over (else RSET it).
    complete: bool = False


class SMTPClientProtocol(LineOnlyReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(self, reactor: Any, timeout: float, data_timeout: float) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.data_timeout = data_timeout
        self._partial: list[str] = []
        self._code: str | None = None
        self._replies: deque[Reply] = deque()
        # Who waits for how many replies, with its timer and the replies so far.
        self._waiting: deque[
            tuple[Deferred[list[Reply]], Any, int, list[Reply], float]
        ] = deque()
        self._lost: Failure | None = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        # STARTTLS: set while its reply is awaited, then while the rest of the packet that
        # carried it is read (anything there was sent in plain text before TLS: refused).
        self._awaiting_tls = False
        self._tls_boundary = False

    # -- receiving ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._tls_boundary:
            # The STARTTLS reply ended this packet; a partial line left behind would be
            # joined to what TLS decrypts (the CVE-2011-0411 class, client side).
            self._tls_boundary = False
            if self._buffer:
                self._abort("data after the STARTTLS reply")

    def lineReceived(self, line: bytes) -> None:
        if self._tls_boundary:
            self._abort("data after the STARTTLS reply")
            return
        text = line.decode("utf-8", "replace")
        if (
            len(text) < 3 or not text[:3].isdigit() or text[0] not in "2345"
            or (len(text) > 3 and text[3] not in " -")
            or len(self._partial) >= MAX_REPLY_LINES
            or (self._code is not None and text[:3] != self._code)
        ):
            self._abort(f"not an SMTP reply: {text[:80]!r}")
            return
        self._partial.append(text[4:])
        if len(text) > 3 and text[3] == "-":
            self._code = text[:3]  # RFC 5321 §4.2.1: every line carries the same code
            return
        reply = Reply(int(text[:3]), tuple(self._partial))
        self._partial = []
        self._code = None
        if self._awaiting_tls:
            self._awaiting_tls = False
            self._tls_boundary = reply.code == 220
        if self._waiting:
            waiter, timer, count, collected, limit = self._waiting[0]
            collected.append(reply)
            if len(collected) == count:
                self._waiting.popleft()
                if timer.active():
                    timer.cancel()
                waiter.callback(collected)
            elif timer.active():
                timer.reset(limit)  # each reply of a pipelined group gets the full time
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort("reply line too long")

    def connectionLost(self, reason: Failure = Failure(ConnectError())) -> None:  # noqa: B008
        self._lost = reason
        while self._waiting:
            waiter, timer, _, _, _ = self._waiting.popleft()
            if timer.active():
                timer.cancel()
            waiter.errback(SMTPConnectionError(f"connection lost: {reason.getErrorMessage()}"))

    def _abort(self, why: str) -> None:
        error = SMTPConnectionError(why)
        self._lost = Failure(error)  # first: a waiter resumed below must see it
        while self._waiting:
            waiter, timer, _, _, _ = self._waiting.popleft()
            if timer.active():
                timer.cancel()
            waiter.errback(error)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    async def reply(self, limit: float | None = None) -> Reply:
        """The next reply from the server."""
        if self._replies:
            return self._replies.popleft()
        return (await self.replies(1, limit))[0]

    async def replies(self, count: int, limit: float | None = None) -> list[Reply]:
        """The next ``count`` replies (a pipelined group), with one wait for all of them
        (``limit`` seconds at most)."""
        got = [self._replies.popleft() for _ in range(min(count, len(self._replies)))]
        if len(got) == count:
            return got
        if self._lost is not None:
            raise SMTPConnectionError(f"connection lost: {self._lost.getErrorMessage()}")
        waiter: Deferred[list[Reply]] = Deferred()
        limit = self.timeout if limit is None else limit
        timer = self._reactor.callLater(limit, self._abort, f"no reply within {limit:g} s")
        self._waiting.append((waiter, timer, count - len(got), [], limit))
        return got + await waiter

    # -- commands -------------------------------------------------------------------------------

    def send(self, *lines: bytes) -> None:
        if self._lost is None and self.transport is not None:
            self.transport.write(b"".join(line + b"\r\n" for line in lines))

    async def command(self, line: bytes, limit: float | None = None) -> Reply:
        self.send(line)
        return await self.reply(limit)

    async def greeting(self) -> Reply:
        return await self.reply()

    async def ehlo(self, name: str) -> Reply:
        """EHLO (HELO if the server knows no EHLO); records the extensions offered."""
        reply = await self.command(b"EHLO " + name.encode("ascii"))
        self.extensions = {}
        if reply.code == 250:
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                self.extensions[keyword.upper()] = params
            return reply
        if reply.code in (500, 502):
            return await self.command(b"HELO " + name.encode("ascii"))
        return reply

    async def starttls(self, context: ssl.CertificateOptions, name: str) -> Reply:
        """STARTTLS, then EHLO again inside TLS (RFC 3207 §4.2: forget what was learnt)."""
        if self._replies:
            self._abort("unexpected replies before STARTTLS")
            raise SMTPConnectionError("unexpected replies before STARTTLS")
        self._awaiting_tls = True
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            return reply
        assert self.transport is not None
        self.transport.startTLS(context)  # type: ignore[attr-defined]
        self.tls = True
        return await self.ehlo(name)

    async def transaction(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> TransactionResult:
        """One mail transaction: MAIL, every RCPT, DATA and the message (dot-stuffed), as one
        pipelined group when the server offers PIPELINING."""
        mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">" + self._mail_parameters(
            sender, recipients, message
        )
        rcpts = [b"RCPT TO:<" + r.encode("utf-8") + b">" for r in recipients]
        if "PIPELINING" in self.extensions:
            self.send(mail, *rcpts, b"DATA")
            mail_reply, *rcpt_replies, data_reply = await self.replies(len(recipients) + 2)
            results = list(zip(recipients, rcpt_replies, strict=True))
            if not mail_reply.positive or not any(reply.positive for _, reply in results):
                if data_reply.code == 354:
                    # RFC 2920 §3.1: DATA accepted though nothing can go: end it empty.
                    await self.command(b".", self.data_timeout)
                return TransactionResult(mail_reply, tuple(results), None)
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.positive:
                return TransactionResult(mail_reply, (), None)
            results = [(r, await self.command(line)) for r, line in zip(recipients, rcpts,
                                                                        strict=True)]
            if not any(reply.positive for _, reply in results):
                return TransactionResult(mail_reply, tuple(results), None)
            data_reply = await self.command(b"DATA")
        if data_reply.code != 354:
            # Refused (4xx/5xx), or an answer that makes no sense here: nothing was sent.
            return TransactionResult(mail_reply, tuple(results), data_reply)
        assert self.transport is not None
        self.transport.write(encode_data(message))
        final = await self.reply(self.data_timeout)
        return TransactionResult(mail_reply, tuple(results), final, complete=True)

    def _mail_parameters(self, sender: str, recipients: Sequence[str], message: bytes) -> bytes:
        params = b""
        if "SIZE" in self.extensions:
            params += b" SIZE=%d" % len(message)
        if "8BITMIME" in self.extensions and not message.isascii():
            params += b" BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions and not (
            sender.isascii() and all(r.isascii() for r in recipients)
        ):
            params += b" SMTPUTF8"
        return params

    async def reset(self) -> Reply:
        return await self.command(b"RSET")

    async def quit(self) -> None:
        """QUIT politely (a short wait for the reply), then close."""
        try:
            await self.command(b"QUIT", min(self.timeout, 10.0))
        except SMTPConnectionError:
            pass
        if self.transport is not None:
            self.transport.loseConnection()

    @property
    def alive(self) -> bool:
        """The connection is open, the server has not said goodbye, and nothing it sent is
        waiting to be read (a reply out of turn, such as a 421, would shift every later one)."""
        return (self._lost is None and self.transport is not None and not self._replies
                and not self._partial
                and not getattr(self.transport, "disconnecting", False))

    def size_limit(self) -> int | None:
        """The server's SIZE limit (RFC 1870), if it announced one."""
        value = self.extensions.get("SIZE", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None


def encode_data(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, leading dots doubled, then CRLF.CRLF."""
    if message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != message.count(
        b"\r\n"
    ):
        # A bare CR or LF is a line end to some receivers and not to others (SMTP smuggling):
        # every one becomes CRLF.
        message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    message = message.replace(b"\r\n.", b"\r\n..")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


def opportunistic_tls() -> ssl.CertificateOptions:
    """STARTTLS to any MX (RFC 3207; RFC 7435 opportunistic security): encryption without
    certificate checks, since an MX is not known to hold a certificate for its name."""
    return ssl.CertificateOptions(
        verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
    )


async def connect(
    reactor: Any, address: str, port: int, connect_timeout: float, reply_timeout: float,
    data_timeout: float,
) -> SMTPClientProtocol:
    """Open a connection to ``address`` (an IPv4 or IPv6 literal)."""
    endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, address, port, timeout=connect_timeout)
    protocol = SMTPClientProtocol(reactor, reply_timeout, data_timeout)
    try:
        await endpoint.connect(_OneProtocol(protocol))
    except Exception as e:  # ConnectionRefusedError, TimeoutError, NoRouteError...
        raise SMTPConnectionError(f"cannot connect to {address}:{port}: {e}") from e
    return protocol


class _OneProtocol(Factory):
    """Hands out one protocol instance, quietly (outbound connections come and go all day;
    the delivery log says what they did)."""

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> SMTPClientProtocol:
        self._protocol.factory = self
        return self._protocol
