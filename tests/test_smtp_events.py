"""Events from the SMTP and IMAP services, observed in-process on the event bus:
message.received for each stored copy, user.login, mailbox.created and message.deleted."""

from __future__ import annotations

import imaplib
import smtplib
import ssl
from pathlib import Path

import pytest_twisted

from tests.dnszone import DNSServer
from tests.espserver import events_of


@pytest_twisted.ensureDeferred
async def test_delivery_and_login_are_announced(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    def submit(ports: dict[str, int], context: ssl.SSLContext) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", ports["smtp-submissions-0"], context=context,
                              timeout=30) as client:
            client.login("alice@example.test", "a long password")
            client.sendmail("alice@example.test", ["bob@example.test"],
                            "Subject: hi\r\nMessage-ID: <e1@example.test>\r\n\r\nhello\r\n")

    seen = await events_of(scratch, database_dsn, test_dns.nameserver,
                           ["alice@example.test", "bob@example.test"], submit)
    logins = [e for e in seen if e.type == "user.login"]
    assert [(e.payload["user"], e.payload["protocol"], e.payload["success"]) for e in logins] == [
        ("alice@example.test", "smtp", True)
    ]
    assert logins[0].payload["client_ip"] == "127.0.0.1"
    received = [e for e in seen if e.type == "message.received"]
    assert len(received) == 1
    payload = received[0].payload
    assert payload["user"] == "bob@example.test" and payload["mailbox"] == "INBOX"
    assert payload["uid"] == 1 and payload["sender"] == "alice@example.test"
    assert payload["message_id"] == "<e1@example.test>"
    assert received[0].domain == "example.test"


@pytest_twisted.ensureDeferred
async def test_imap_logins_mailboxes_and_deletions_are_announced(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    def session(ports: dict[str, int], context: ssl.SSLContext) -> None:
        client = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps-0"], ssl_context=context,
                                   timeout=30)
        try:
            client.login("carl@example.test", "wrong password")
        except imaplib.IMAP4.error:
            pass
        client.login("carl@example.test", "a long password")
        client.create("Receipts")
        client.append("Receipts", None, None, b"Subject: paid\r\n\r\nthanks\r\n")
        client.select("Receipts")
        client.store("1", "+FLAGS", "(\\Deleted)")
        client.expunge()
        client.logout()

    seen = await events_of(scratch, database_dsn, test_dns.nameserver,
                           ["carl@example.test"], session)
    logins = [(e.payload["user"], e.payload["protocol"], e.payload["success"])
              for e in seen if e.type == "user.login"]
    assert logins == [("carl@example.test", "imap", False), ("carl@example.test", "imap", True)]
    created = [e.payload for e in seen if e.type == "mailbox.created"]
    assert created == [{"user": "carl@example.test", "mailbox": "Receipts", "protocol": "imap"}]
    received = [e.payload for e in seen if e.type == "message.received"]
    assert [(p["mailbox"], p["uid"], p["protocol"]) for p in received] == [("Receipts", 1, "imap")]
    deleted = [e.payload for e in seen if e.type == "message.deleted"]
    assert [(p["mailbox"], p["uid"], p["reason"]) for p in deleted] == [("Receipts", 1, "expunge")]
