"""IDLE sessions woken together: many sessions idling on one mailbox, over plain TCP, implicit
TLS and STARTTLS, each hear of a delivery exactly once, and a session that left IDLE hears of
the next change at its next command."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.test_imap import deliver, read_until

USER = "ida@example.test"
PASSWORD = "ida's long password"
LOGIN = f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode()


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver,
                       extra="    allow_plaintext_on_loopback: true\n")
    server.add_user(USER, PASSWORD)
    yield server
    server.process.stop()


Sock = socket.socket | ssl.SSLSocket


def command(sock: Sock, data: bytes, tag: bytes) -> bytes:
    sock.sendall(data)
    return read_until(sock, rb"(^|\r\n)" + tag + rb" (OK|NO|BAD)[^\r]*\r\n$")


def plain(esp: EspServer) -> Sock:
    sock = socket.create_connection(("127.0.0.1", esp.ports["imap"]), timeout=30)
    read_until(sock, rb"\r\n")
    return sock


def implicit_tls(esp: EspServer) -> Sock:
    sock = esp.client_tls().wrap_socket(
        socket.create_connection(("127.0.0.1", esp.ports["imaps"]), timeout=30))
    read_until(sock, rb"\r\n")
    return sock


def starttls(esp: EspServer) -> Sock:
    sock = plain(esp)
    assert b"s1 OK" in command(sock, b"s1 STARTTLS\r\n", b"s1")
    return esp.client_tls().wrap_socket(sock)


def idle(sock: Sock, exists: int) -> None:
    assert b"a1 OK" in command(sock, LOGIN, b"a1")
    assert b"* %d EXISTS" % exists in command(sock, b"a2 SELECT INBOX\r\n", b"a2")
    sock.sendall(b"a3 IDLE\r\n")
    assert read_until(sock, rb"\r\n").startswith(b"+")


def test_every_idle_session_hears_of_a_delivery_once(esp: EspServer) -> None:
    deliver(esp, "first", to=USER)
    sessions = ([plain(esp) for _ in range(20)] + [implicit_tls(esp) for _ in range(3)]
                + [starttls(esp) for _ in range(3)])
    for sock in sessions:
        idle(sock, exists=1)
    watcher = plain(esp)  # selected but not idling: hears at its next command
    assert b"* 1 EXISTS" in (command(watcher, LOGIN, b"a1")
                             + command(watcher, b"a2 SELECT INBOX\r\n", b"a2"))

    deliver(esp, "second", to=USER)
    for sock in sessions:
        assert read_until(sock, rb"\* 2 EXISTS\r\n") == b"* 2 EXISTS\r\n"
    for sock in sessions:
        told = command(sock, b"DONE\r\n", b"a3")
        assert b"EXISTS" not in told and told.endswith(b"a3 OK IDLE terminated\r\n")
    assert b"* 2 EXISTS" in command(watcher, b"a3 NOOP\r\n", b"a3")

    # Out of IDLE, the sessions hear of the next delivery with their next command.
    deliver(esp, "third", to=USER)
    for sock in sessions[:2] + sessions[-2:]:
        assert b"* 3 EXISTS" in command(sock, b"a4 NOOP\r\n", b"a4")
    for sock in [*sessions, watcher]:
        sock.close()
