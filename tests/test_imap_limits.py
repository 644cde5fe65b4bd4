"""IMAP limits: connections per address, sessions per user, failed logins, and an APPEND
larger than the quota refused before it is sent."""

from __future__ import annotations

import imaplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.test_imap import exchange, raw_session

PASSWORD = "judy's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(
        module_scratch, module_database_dsn, test_dns.nameserver,
        imap="    connections_per_ip: 4\n    sessions_per_user: 2\n"
             "    auth_failures_per_ip: 2\n",
    )
    server.add_user("judy@example.test", PASSWORD, quota=2000)
    yield server
    server.process.stop()


def connect(esp: EspServer) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=esp.client_tls(),
                             timeout=30)


def test_sessions_per_user_and_connections_per_address(esp: EspServer) -> None:
    first, second, third = connect(esp), connect(esp), connect(esp)
    assert first.login("judy@example.test", PASSWORD)[0] == "OK"
    assert second.login("judy@example.test", PASSWORD)[0] == "OK"
    with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
        third.login("judy@example.test", PASSWORD)
    fourth = connect(esp)
    # A fifth connection from this address is turned away at once.
    sock = socket.create_connection(("127.0.0.1", esp.ports["imaps"]), timeout=30)
    tls = esp.client_tls().wrap_socket(sock)
    assert tls.recv(4096).startswith(b"* BYE")
    tls.close()
    first.logout()
    assert third.login("judy@example.test", PASSWORD)[0] == "OK"  # a slot is free again
    for client in (second, third, fourth):
        client.logout()


def test_append_larger_than_the_quota_is_refused_before_it_is_sent(esp: EspServer) -> None:
    sock = raw_session(esp)
    exchange(sock, b'a1 LOGIN "judy@example.test" "' + PASSWORD.encode() + b'"\r\n', b"a1")
    reply = exchange(sock, b"a2 APPEND INBOX {5000}\r\n", b"a2")
    assert reply.startswith(b"a2 NO [OVERQUOTA]")  # no "+": the client never sends it
    assert b"a3 OK" in exchange(sock, b"a3 NOOP\r\n", b"a3")
    sock.close()


# Last in this module: afterwards this address is refused for ten minutes.
def test_failed_logins_end_the_session_and_refuse_the_address(esp: EspServer) -> None:
    client = connect(esp)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("judy@example.test", "wrong")
    with pytest.raises(imaplib.IMAP4.abort, match="Too many failed logins"):
        client.login("judy@example.test", "wrong again")
    with pytest.raises((imaplib.IMAP4.abort, ssl.SSLError, OSError)):
        client.noop()
    sock = socket.create_connection(("127.0.0.1", esp.ports["imaps"]), timeout=30)
    tls = esp.client_tls().wrap_socket(sock)
    assert tls.recv(4096).startswith(b"* BYE [UNAVAILABLE] Too many failed")
    tls.close()
