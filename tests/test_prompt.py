"""ESP's listeners send a reply at once (esp.prompt): what a protocol writes is on the wire
before the protocol hands control back to the reactor, and what the socket cannot take at once
is queued behind, in order.  Requests to a helper process go the same way."""

from __future__ import annotations

import os
import select
import shutil
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from esp.listeners import ListenerService
from esp.prompt import write_to_child


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
    read: Deferred[bytes] = Deferred()
    client: list[socket.socket] = []

    class Answer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"reply to " + data)
            # The client is a blocking socket of this very thread: the reactor cannot run
            # before this returns, so only a reply already sent can be read here (a queued
            # one times the read out).
            try:
                read.callback(client[0].recv(100))
            except TimeoutError:
                read.callback(b"(nothing: the reply was queued)")

    service = _listen(Answer)
    try:
        client.append(socket.create_connection(("127.0.0.1", _port(service)), timeout=5))
        client[0].sendall(b"hello")
        assert await read == b"reply to hello"
    finally:
        if client:
            client[0].close()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_each_read_renews_the_prompt_send_without_forcing_a_turn() -> None:
    answers: list[tuple[bytes, bool]] = []
    done: Deferred[None] = Deferred()
    client: list[socket.socket] = []

    class Answer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            before = set(reactor.getDelayedCalls())
            self.transport.write(b"reply to " + data)
            # Nothing scheduled for it: a timer would make the reactor turn once more.
            scheduled = not set(reactor.getDelayedCalls()) <= before
            try:
                answers.append((client[0].recv(100), scheduled))
            except TimeoutError:
                answers.append((b"(nothing: the reply was queued)", scheduled))
            if len(answers) == 2:
                done.callback(None)
            else:
                client[0].sendall(b"two")

    service = _listen(Answer)
    try:
        client.append(socket.create_connection(("127.0.0.1", _port(service)), timeout=5))
        client[0].sendall(b"one")
        await done
        assert answers == [(b"reply to one", False), (b"reply to two", False)]
    finally:
        if client:
            client[0].close()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_rest_of_a_turn_s_writes_leave_together_without_waiting_for_an_ack() -> None:
    first: Deferred[bytes] = Deferred()
    nodelay: list[int] = []
    client: list[socket.socket] = []

    class Answer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"* 1 FETCH\r\n")
            self.transport.write(b"* 2 FETCH\r\n")
            self.transport.writeSequence([b"a OK ", b"done\r\n"])
            # Only the turn's first write has left; the rest goes in one send next turn.
            received = client[0].recv(100)
            handle = self.transport.getHandle()
            nodelay.append(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            first.callback(received)

    service = _listen(Answer)
    try:
        client.append(socket.create_connection(("127.0.0.1", _port(service)), timeout=5))
        client[0].sendall(b"a FETCH 1:2 FLAGS\r\n")
        assert await first == b"* 1 FETCH\r\n"
        # Without TCP_NODELAY the kernel would hold the second send until the client
        # acknowledged the first (a delayed ACK: 40 ms or more).
        assert nodelay and nodelay[0] != 0

        def rest() -> bytes:
            data = b""
            while not data.endswith(b"done\r\n"):
                data += client[0].recv(100)
            return data

        assert await deferToThread(rest) == b"* 2 FETCH\r\na OK done\r\n"
    finally:
        if client:
            client[0].close()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_pull_producer_is_asked_for_everything() -> None:
    @implementer(IPullProducer)
    class Chunks:
        def __init__(self, transport: Any) -> None:
            self.transport = transport
            self.left = 5

        def resumeProducing(self) -> None:
            if not self.left:
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
            self.left -= 1
            self.transport.write(b"x" * 1000)

        def stopProducing(self) -> None:
            pass

    class Send(Protocol):
        def connectionMade(self) -> None:
            self.transport.registerProducer(Chunks(self.transport), False)

    service = _listen(Send)
    try:
        assert await deferToThread(_read_all, _port(service)) == b"x" * 5000
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_nothing_written_after_an_abort_reaches_the_peer() -> None:
    class Abort(Protocol):
        def connectionMade(self) -> None:
            self.transport.abortConnection()
            self.transport.write(b"written after abort")

    service = _listen(Abort)
    try:
        # Whatever ends the connection (a reset, a close; a time-out if the reactor is slow
        # to close it), only what arrived before matters.
        received = await deferToThread(_read_all, _port(service), OSError)
        assert b"after abort" not in received
    finally:
        await service.stopService()


def _read_all(port: int, ending: type[OSError] = ConnectionResetError) -> bytes:
    """Everything the server sends until it closes (or an ``ending`` error ends it)."""
    chunks = []
    try:
        # The connect itself can meet the end: a server that aborts as soon as it accepts may
        # reset the connection before connect() has returned.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except ending:
        pass
    return b"".join(chunks)


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
        received = await deferToThread(_read_all, _port(service))
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

    cat = shutil.which("cat")
    assert cat is not None, "cat (coreutils) is needed"
    process = reactor.spawnProcess(Helper(), cat, [cat], childFDs={0: "w", 1: write_end})
    os.close(write_end)
    try:
        write_to_child(process, b"request")
        # Still in this turn of the reactor: only bytes already in cat's stdin can come back.
        ready, _, _ = select.select([read_end], [], [], 5)
        assert ready, "the request was queued for a later turn of the reactor"
        assert os.read(read_end, 100) == b"request"
        # A second request of the same turn goes at once too (no Nagle on a pipe).
        write_to_child(process, b"another")
        ready, _, _ = select.select([read_end], [], [], 5)
        assert ready, "the second request was queued for a later turn of the reactor"
        assert os.read(read_end, 100) == b"another"
    finally:
        process.closeStdin()
        await ended
        os.close(read_end)


def test_a_shared_port_takes_one_waiting_connection_per_wake_up() -> None:
    """Several processes accept from a worker pool's socket: each takes one connection when
    woken, not the whole burst (Twisted's own port accepts up to a hundred at once)."""
    built: list[Protocol] = []

    class Counted(Factory):
        protocol = Protocol

        def buildProtocol(self, addr: object) -> Protocol | None:
            made = super().buildProtocol(addr)
            assert made is not None
            built.append(made)
            return made

    service = ListenerService("prompt-0", "tcp:0:interface=127.0.0.1", reactor, Counted)
    service.shared = True
    service.startService()
    clients = []
    try:
        assert service.port is not None
        port: Any = service.port
        # Three connections wait in the backlog (the kernel completes them): one wake-up,
        # driven here by hand, takes one of them; the next takes the next.
        clients = [socket.create_connection(("127.0.0.1", _port(service)), timeout=5)
                   for _ in range(3)]
        port.doRead()
        assert len(built) == 1
        port.doRead()
        assert len(built) == 2
        assert port.numberAccepts == 1
    finally:
        for client in clients:
            client.close()
        for protocol in built:
            protocol.transport.abortConnection()
        service.stopService()
