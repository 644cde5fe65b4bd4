"""ESP's listeners send a reply at once (esp.prompt): what a protocol writes is on the wire
before the protocol hands control back to the reactor, and what the socket cannot take at once
is queued behind, in order.  Requests to a helper process go the same way."""

from __future__ import annotations

import os
import select
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.threads import deferToThread

from esp.listeners import ListenerService
from esp.prompt import write_to_child
from tests.helpers import until


def _listen(protocol: type[Protocol]) -> ListenerService:
    service = ListenerService("prompt-0", "tcp:0:interface=127.0.0.1", reactor,
                              lambda: Factory.forProtocol(protocol))
    service.startService()
    return service


def _port(service: ListenerService) -> int:
    assert service.port is not None
    host: Any = service.port.getHost()
    return int(host.port)


@pytest_twisted.ensureDeferred
async def test_a_reply_is_sent_before_the_reactor_turns_again() -> None:
    read: list[bytes] = []
    client: list[socket.socket] = []

    class Answer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"reply to " + data)
            # The client is a blocking socket of this very thread: the reactor cannot run
            # before this returns, so only a reply already sent can be read here (a queued
            # one times the read out).
            try:
                read.append(client[0].recv(100))
            except TimeoutError:
                read.append(b"(nothing: the reply was queued)")

    service = _listen(Answer)
    try:
        client.append(socket.create_connection(("127.0.0.1", _port(service)), timeout=5))
        client[0].sendall(b"hello")
        await until(lambda: bool(read))
        assert read == [b"reply to hello"]
    finally:
        if client:
            client[0].close()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_cannot_take_is_queued_in_order() -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: far more than a socket buffer takes at once

    class Burst(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(big)
            self.transport.writeSequence([b"and ", b"then"])
            self.transport.write(b" the end")
            self.transport.loseConnection()

    service = _listen(Burst)
    try:
        def read_all(port: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                chunks = []
                while chunk := s.recv(1 << 16):
                    chunks.append(chunk)
                return b"".join(chunks)

        received = await deferToThread(read_all, _port(service))
        assert len(received) == len(big) + len(b"and then the end")
        assert received == big + b"and then the end"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_to_a_helper_process_is_written_before_the_reactor_turns() -> None:
    # `cat` copies its standard input to a pipe of ours that the reactor does not watch.
    read_end, write_end = os.pipe()
    ended: Deferred[None] = Deferred()

    class Helper(ProcessProtocol):
        def processEnded(self, reason: Any) -> None:
            ended.callback(None)

    process = reactor.spawnProcess(Helper(), "cat", ["cat"], childFDs={0: "w", 1: write_end})
    os.close(write_end)
    try:
        write_to_child(process, b"request")
        # Still in this turn of the reactor: only bytes already in cat's stdin can come back.
        ready, _, _ = select.select([read_end], [], [], 5)
        assert ready, "the request was queued for a later turn of the reactor"
        assert os.read(read_end, 100) == b"request"
    finally:
        process.closeStdin()
        await ended
        os.close(read_end)
