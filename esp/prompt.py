"""Listening ports whose connections send what they are given at once (and the same for a
helper process's standard input).

A Twisted TCP transport queues every ``write`` and sends it on the reactor's next turn: it
asks epoll to watch the socket for writing, waits for the next poll, sends, and asks epoll to
stop watching.  For a protocol that answers one short line per command (SMTP, IMAP) that is
two extra system calls and one extra reactor turn per reply, and the reply waits behind
everything else the turn handles.  asyncio's transports (and Postfix, Dovecot) send at once
when nothing is queued and queue only what the socket does not take; so do the connections
of :class:`PromptPort`, and the TLS layer of a connection that starts TLS sends its records
the same way.  Measured on the SMTP acceptance benchmark: 12 % less CPU per message and
12 % more messages per second (bench/RESULTS.md).

Everything else (ordering, flow control, producers, closing) is Twisted's own: a prompt send
happens only when the transport's queue is empty, and whatever the socket does not take, or
any error, goes through the ordinary queued path.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import _newtls, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.posixbase import PosixReactorBase


def send_now(connection: Any, data: bytes) -> bytes:
    """Send what the file descriptor ``connection`` takes of ``data`` now, if nothing of it is
    queued; return what is left for the queue (all of it when something was queued, the
    descriptor is closing, or sending failed: the queued path then meets the error again on
    the next turn and closes as it always does)."""
    if (
        data
        and connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnected
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    ):
        sent = connection.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            return data[sent:]
    return data


def send_promptly(connection: Any, data: bytes) -> None:
    """``FileDescriptor.write(connection, data)``, but sent now if nothing is queued."""
    rest = send_now(connection, data)
    if rest:
        FileDescriptor.write(connection, rest)


def write_to_child(process: Any, data: bytes) -> None:
    """``process.write(data)`` (to the child's standard input), sent now if nothing is
    queued: a request to a helper process need not wait for the reactor's next turn."""
    writer = getattr(process, "pipes", {}).get(0)
    rest = send_now(writer, data) if isinstance(writer, FileDescriptor) else data
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
    """A server connection that sends at once when nothing is queued."""

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


class PromptListening:
    """The reactor, except that the TCP ports it makes (``listenTCP``, as TCP endpoints call
    it, and ``adoptStreamPort``) are :class:`PromptPort`."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> PromptPort:
        listening = PromptPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        if family not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(fd, family, factory)
        listening = PromptPort._fromListeningDescriptor(self._reactor, fd, family, factory)
        listening.startListening()
        return listening


def prompt_listening(reactor: Any) -> Any:
    """:class:`PromptListening` over ``reactor`` when its TCP ports are Twisted's ``tcp.Port``
    (every POSIX reactor); any other reactor as it is."""
    return PromptListening(reactor) if isinstance(reactor, PosixReactorBase) else reactor
