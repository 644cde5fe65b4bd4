"""ClamAV: the message to clamd with INSTREAM (a Twisted protocol, over TCP or a unix socket),
in chunks, within a size limit.

clamd must scan mail (``ScanMail yes``) to look inside MIME parts.  A match rejects the
message with 554 5.7.1 naming the signature (or quarantines it, per ``on_virus``) and
publishes ``virus.detected``; a clean message gets ``X-Virus-Scanned``.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, cast

from pydantic import Field
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from esp.events import VIRUS_DETECTED, Event
from esp.filters import FilterContext, FilterServices, FilterSettings, Verdict, by_domain
from esp.interfaces import IMessageFilter

CHUNK = 64 * 1024
MAX_REPLY = 4096


class ClamAVSettings(FilterSettings):
    address: str = Field("tcp:host=127.0.0.1:port=3310",
                         description="clamd as a Twisted client endpoint: "
                         "tcp:host=H:port=P or unix:path=/run/clamav/clamd.ctl")
    max_size: int = Field(25 * 1024 * 1024, ge=1, description="larger messages are not "
                          "scanned (keep it at or under clamd's StreamMaxLength)")
    on_virus: Literal["reject", "quarantine"] = "reject"
    timeout: float = Field(30.0, gt=0, le=600)


class ClamdError(Exception):
    pass


class InStream(Protocol):
    """Send one message with ``zINSTREAM``, read clamd's one reply (ends with NUL)."""

    def __init__(self, message: bytes) -> None:
        self._message = message
        self._reply = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"zINSTREAM\0")
        view = memoryview(self._message)
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            self.transport.write(struct.pack(">I", len(piece)) + bytes(piece))
        self.transport.write(struct.pack(">I", 0))

    def dataReceived(self, data: bytes) -> None:
        self._reply += data
        if b"\0" in self._reply or len(self._reply) > MAX_REPLY:
            reply = self._reply.split(b"\0", 1)[0]
            if not self.done.called:
                self.done.callback(reply)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(ClamdError(f"clamd closed the connection without an answer: "
                                         f"{reason.getErrorMessage()}"))


def parse_reply(reply: bytes) -> str | None:
    """The signature name when clamd found one, None when the stream is clean."""
    text = reply.decode("utf-8", "replace").strip()
    _, _, result = text.partition(": ")
    if result == "OK":
        return None
    if result.endswith(" FOUND"):
        return result[:-len(" FOUND")]
    raise ClamdError(f"clamd answered {text[:200]!r}")


@implementer(IMessageFilter)
class ClamAVFilter:
    name = "clamav"

    def __init__(self, settings: ClamAVSettings, services: FilterServices) -> None:
        self._settings = settings
        self._services = services
        self._endpoint = clientFromString(services.reactor, settings.address)

    async def check(self, context: FilterContext) -> Verdict:
        if len(context.message) > self._settings.max_size:
            return Verdict(headers=(("X-Virus-Scanned", "skipped: message too large"),))
        protocol = InStream(context.message)
        connected: Any = self._endpoint.connect(Factory.forProtocol(lambda: protocol))
        try:
            await connected
            reply = await protocol.done
        finally:
            # Abort, not close: after a timeout clamd may have stopped reading, and a close
            # would wait to flush the rest of the message to it.
            if protocol.transport is not None and not protocol.done.called:
                cast(ITCPTransport, protocol.transport).abortConnection()
        signature = parse_reply(reply)
        if signature is None:
            return Verdict(headers=(("X-Virus-Scanned", f"ClamAV on {self._services.hostname}"),))
        self._announce(context, signature)
        if self._settings.on_virus == "quarantine":
            return Verdict("quarantine", headers=(("X-Virus", signature),),
                           details={"signature": signature})
        return Verdict.reject(f"Message contains a virus ({signature})", code=554,
                              status="5.7.1", details={"signature": signature})

    def _announce(self, context: FilterContext, signature: str) -> None:
        if self._services.events is None:
            return
        for domain, recipients in by_domain(context):
            self._services.events.publish(Event(
                VIRUS_DETECTED,
                {"filter": self.name, "signature": signature, "sender": context.sender,
                 "recipients": recipients, "client_ip": context.client_ip,
                 "outcome": self._settings.on_virus},
                domain=domain,
            ))
