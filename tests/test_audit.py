"""The audit log: failed (and successful) logins over SMTP, IMAP and the API, with the
account, the client's address and the time; changes over the API beside them."""

from __future__ import annotations

import imaplib
import json
import smtplib
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted

from tests.dnszone import DNSServer
from tests.espserver import events_of
from tests.helpers import until


def audit(dsn: str) -> list[tuple[str, str | None, str, str | None]]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, host(actor_ip), action, target FROM audit_log "
                    "WHERE occurred_at > now() - interval '10 minutes' ORDER BY id")
        return list(cur.fetchall())


@pytest_twisted.ensureDeferred
async def test_failed_logins_of_every_protocol_are_audited(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    def client(ports: dict[str, int], context: ssl.SSLContext) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", ports["smtp-submissions-0"], context=context,
                              timeout=60) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("alice@example.test", "not the password")
        with imaplib.IMAP4_SSL("127.0.0.1", ports["imaps-0"], ssl_context=context) as imap:
            with pytest.raises(imaplib.IMAP4.error):
                imap.login("alice@example.test", "not the password either")
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['api-0']}/api/v1/auth/token", method="POST",
            data=json.dumps({"username": "alice@example.test", "password": "guess"}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 (loopback)
        with imaplib.IMAP4_SSL("127.0.0.1", ports["imaps-0"], ssl_context=context) as imap:
            imap.login("alice@example.test", "a long password")

    async def written() -> None:
        await until(lambda: {r[2:] for r in audit(database_dsn)} >= {
            ("login.failed", "smtp"), ("login.failed", "imap"), ("login.failed", "api"),
            ("login", "imap")})

    await events_of(scratch, database_dsn, test_dns.nameserver, ["alice@example.test"],
                    client, settle=written)
    # (smtplib tries each mechanism the server offers: one failure per mechanism.)
    assert set(audit(database_dsn)) == {
        ("alice@example.test", "127.0.0.1", "login.failed", "smtp"),
        ("alice@example.test", "127.0.0.1", "login.failed", "imap"),
        ("alice@example.test", "127.0.0.1", "login.failed", "api"),
        ("alice@example.test", "127.0.0.1", "login", "imap"),
    }
