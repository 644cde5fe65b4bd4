"""Listening ports whose connections send a reply at once (and the same for a helper
process's standard input).

A Twisted TCP transport queues every ``write`` and sends it on the reactor's next turn: it
asks epoll to watch the socket for writing, waits for the next poll, sends, and asks epoll to
stop watching.  For a protocol that answers one short line per command (SMTP, IMAP) that is
two extra system calls and one extra reactor turn per reply, and the reply waits behind
everything else the turn handles.  asyncio's transports (and Postfix, Dovecot) send at once
when nothing is queued.  The connections of :class:`PromptPort` send their *first* write after
each read at once when nothing is queued before it: the answer to a command, or the answer
that comes later (a 250 once the message is stored) if the command's turn wrote nothing.  What
else is written before the next read (the rest of a multi-line answer, a FETCH's further
messages, an IDLE push) is queued and leaves together on the next turn, as Twisted would send
it.  The sockets have ``TCP_NODELAY`` (as asyncio's): without it, the kernel would hold that
second send until the client acknowledged the first, which a client waiting for the rest of an
answer delays by 40 ms or more.  Measured on the SMTP acceptance benchmark: 12 % less CPU per
message and 12 % more messages per second (bench/RESULTS.md).  (The allowance was once renewed
at every reactor turn by a ``callLater(0)``, which forced one more turn after each: with two
worker processes, each reactor polled four times per message.)

A connection that starts TLS writes its records through the same path; Twisted's TLS layer
itself holds application data until the end of the turn, so TLS replies gain the saved turn
and system calls, not the immediacy.  Requests to a helper process (a pipe, a Unix socket) are
sent at once whenever nothing is queued: there is no Nagle's algorithm to mind there.

Everything else is Twisted's own: no prompt send while anything is queued, while a pull
producer is registered (it is asked for more only by the queued path), once the connection is
closing or aborted, for anything but bytes, or for writes larger than one send; whatever the
socket does not take, and any error, goes through the ordinary queued path.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import _newtls, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.posixbase import PosixReactorBase


def send_now(connection: Any, data: bytes, once_per_read: bool = True) -> bytes:
    """Send what the file descriptor ``connection`` takes of ``data`` now if nothing is queued
    before it (and, with ``once_per_read``, if it has not sent at once since it last read);
    return what is left for the queue (all of it when it may not be sent now, or sending
    failed: the queued path then meets the error again on the next turn and closes as it
    always does)."""
    if (
        type(data) is bytes
        and 0 < len(data) <= connection.SEND_LIMIT
        and not (once_per_read and getattr(connection, "_prompt_spent", False))
        and connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnected
        and not getattr(connection, "_aborting", False)
        and (connection.producer is None or connection.streamingProducer)
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    ):
        if once_per_read:
            connection._prompt_spent = True
        sent = connection.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            return data[sent:]
    return data


def send_promptly(connection: Any, data: bytes, once_per_read: bool = True) -> None:
    """``FileDescriptor.write(connection, data)``, but sent now if nothing is queued (see
    :func:`send_now`)."""
    rest = send_now(connection, data, once_per_read)
    if rest:
        FileDescriptor.write(connection, rest)


def write_to_child(process: Any, data: bytes) -> None:
    """``process.write(data)`` (to the child's standard input), sent now if nothing is
    queued: a request to a helper process need not wait for the reactor's next turn."""
    writer = getattr(process, "pipes", {}).get(0)
    rest = (send_now(writer, data, once_per_read=False) if isinstance(writer, FileDescriptor)
            else data)
    if rest:
        process.write(rest)


class _PromptBypass(FileDescriptor):
    """What the TLS layer of a connection writes its records through (``_newtls``'s bypass
    base, normally FileDescriptor itself)."""

    def write(self, data: bytes) -> None:
        send_promptly(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        send_promptly(self, b"".join(iovec))


class PromptServer(tcp.Server):
    """A server connection that sends its first write after each read at once when nothing
    is queued."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setTcpNoDelay(True)

    def doRead(self) -> Any:
        self._prompt_spent = False
        return super().doRead()

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # to the TLS layer, whose records come back via _PromptBypass
        else:
            send_promptly(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            super().writeSequence(iovec)
        else:
            send_promptly(self, b"".join(iovec))

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _PromptBypass)


class PromptPort(tcp.Port):
    transport = PromptServer


class SharedPromptPort(PromptPort):
    """A port whose socket other processes (workers) also accept from.  Twisted accepts up to
    a hundred pending connections per wake-up: the first process to wake would take a whole
    burst while the others, woken too, find nothing.  This one takes one at a time, so that
    a burst is shared among whichever processes are free to take it."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # Port.doRead's own scaling of its accept loop


class PromptListening:
    """The reactor, except that the TCP ports it makes (``listenTCP``, as TCP endpoints call
    it, and ``adoptStreamPort``) are :class:`PromptPort` (:class:`SharedPromptPort` with
    ``one_at_a_time``)."""

    def __init__(self, reactor: Any, one_at_a_time: bool = False) -> None:
        self._reactor = reactor
        self._port = SharedPromptPort if one_at_a_time else PromptPort

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> PromptPort:
        listening = self._port(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        if family not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(fd, family, factory)
        listening = self._port._fromListeningDescriptor(self._reactor, fd, family, factory)
        listening.startListening()
        return listening


def prompt_listening(reactor: Any, one_at_a_time: bool = False) -> Any:
    """:class:`PromptListening` over ``reactor`` when its TCP ports are Twisted's ``tcp.Port``
    (every POSIX reactor); any other reactor as it is."""
    if isinstance(reactor, PosixReactorBase):
        return PromptListening(reactor, one_at_a_time)
    return reactor
