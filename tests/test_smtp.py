"""SMTP over real sockets: ESP as a twistd process, clients smtplib and swaks, real PostgreSQL."""

from __future__ import annotations

import itertools
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, connection, start_esp

PASSWORD = "alice's long password"


@pytest.fixture(scope="module")
def esp(
    module_scratch: Path, module_database_dsn: str, test_dns: DNSServer
) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("alice@example.test", PASSWORD)
    server.add_user("bob@example.test", "bob's long password")
    server.add_user("tiny@example.test", "tiny's long password", quota=1000)
    server.add_alias("postmaster@example.test", "alice@example.test")
    yield server
    server.process.stop()


def message(subject: str, to: str = "bob@example.test", sender: str = "carol@remote.test",
            body: str = "Hello Bob.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@remote.test>"
    msg.set_content(body)
    return msg


def stored_subjects(esp: EspServer, address: str, mailbox: str = "INBOX") -> list[str]:
    local, _, domain = address.partition("@")
    with connection(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT m.subject FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id
            JOIN users u ON u.id = b.user_id WHERE u.localpart = %s AND b.name = %s
            ORDER BY m.uid
            """,
            (local, mailbox),
        )
        return [r[0] for r in cur.fetchall()]


def test_mx_advertises_the_extensions_and_no_auth(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        code, banner = client.ehlo("client.remote.test")
        assert code == 250
        for extension in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "starttls",
                          "smtputf8", "chunking"):
            assert client.has_extn(extension), banner
        assert client.esmtp_features["size"] == "1048576"
        assert not client.has_extn("auth")  # port 25 is for mail to us, not for relaying


def test_mx_delivers_to_a_local_user_with_smtplib(esp: EspServer) -> None:
    msg = message("mx plain")
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        refused = client.send_message(msg, "carol@remote.test", ["bob@example.test"])
    assert refused == {}
    assert "mx plain" in stored_subjects(esp, "bob@example.test")
    uid, size, filename = esp.messages("bob@example.test")[-1]
    data = esp.message_file("bob@example.test", filename)
    assert size == len(data)
    # Our headers on top: the authentication results, then the trace header.
    assert data.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=none")
    received = data[data.index(b"\r\nReceived: from ") + 2 :]
    assert b" ([127.0.0.1])\r\n" in received.split(b"\r\n\t")[0] + b"\r\n"
    assert b"\tby mx.example.test (ESP) with ESMTP id " in received
    # The date after the ';' is the time of receipt, RFC 5322 date-time.
    lines = received.split(b"\r\n")
    field = b"".join([lines[0], *itertools.takewhile(lambda x: x.startswith(b"\t"), lines[1:])])
    stamp = field.rsplit(b";", 1)[1].strip().decode()
    assert abs(parsedate_to_datetime(stamp).timestamp() - time.time()) < 120
    assert b"\r\nSubject: mx plain\r\n" in data
    assert data.endswith(b"Hello Bob.\r\n")


def test_mx_with_starttls_records_esmtps(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.starttls(context=esp.client_tls())
        client.send_message(message("mx tls"), "carol@remote.test", ["bob@example.test"])
    _uid, _size, filename = esp.messages("bob@example.test")[-1]
    assert b" with ESMTPS id " in esp.message_file("bob@example.test", filename)


def test_submission_needs_starttls_then_auth(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["submission"], timeout=30) as client:
        client.ehlo("laptop")
        assert not client.has_extn("auth")  # no password over clear text
        code, reply = client.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwYXNzd29yZA==")
        assert code == 538 and reply.startswith(b"5.7.11")
        code, reply = client.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530
        client.starttls(context=esp.client_tls())
        client.ehlo("laptop")
        assert client.has_extn("auth")
        assert "PLAIN" in client.esmtp_features["auth"]
        code, _ = client.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530  # authentication required
        client.login("alice@example.test", PASSWORD)
        refused = client.send_message(
            message("submitted", sender="alice@example.test"),
            "alice@example.test", ["bob@example.test", "friend@remote.test"],
        )
    assert refused == {}
    assert "submitted" in stored_subjects(esp, "bob@example.test")
    with connection(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT q.recipient_domain, r.address, o.sender FROM queue q "
            "JOIN queue_recipients r ON r.queue_id = q.id "
            "JOIN outbound_messages o ON o.id = q.message_id"
        )
        assert ("remote.test", "friend@remote.test", "alice@example.test") in cur.fetchall()
    _uid, _size, filename = esp.messages("bob@example.test")[-1]
    assert b" with ESMTPSA id " in esp.message_file("bob@example.test", filename)


def test_submissions_on_implicit_tls(esp: EspServer) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", esp.ports["submissions"], context=esp.client_tls(), timeout=30
    ) as client:
        client.ehlo("laptop")
        assert not client.has_extn("starttls")
        client.login("alice@example.test", PASSWORD)
        client.send_message(
            message("over 465", sender="alice@example.test"),
            "alice@example.test", ["bob@example.test"],
        )
    assert "over 465" in stored_subjects(esp, "bob@example.test")


@pytest.mark.parametrize(
    "port, options",
    [
        ("mx", ["--from", "carol@remote.test"]),
        ("mx", ["--from", "carol@remote.test", "--tls"]),
        ("submission", ["--from", "alice@example.test", "--tls", "--auth", "PLAIN"]),
        ("submission", ["--from", "alice@example.test", "--tls", "--auth", "LOGIN"]),
        ("submissions", ["--from", "alice@example.test", "--tls-on-connect", "--auth", "PLAIN"]),
    ],
)
def test_swaks_delivers_on_each_port(esp: EspServer, port: str, options: list[str]) -> None:
    subject = f"swaks {port} {' '.join(options[2:])}".strip()
    auth = ["--auth-user", "alice@example.test", "--auth-password", PASSWORD] if (
        "--auth" in options) else []
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{esp.ports[port]}", "--to", "bob@example.test",
         "--helo", "swaks.remote.test", "--header", f"Subject: {subject}",
         "--timeout", "30", *options, *auth],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert subject in stored_subjects(esp, "bob@example.test")


def test_unauthenticated_relay_is_refused(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.ehlo("spammer")
        client.mail("carol@remote.test")
        code, reply = client.rcpt("victim@elsewhere.test")
        assert code == 554 and reply.startswith(b"5.7.1") and b"Relay access denied" in reply


def test_unknown_local_user_is_refused(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.ehlo("client")
        client.mail("carol@remote.test")
        code, reply = client.rcpt("nobody@example.test")
        assert code == 550 and reply.startswith(b"5.1.1")
        code, reply = client.rcpt("postmaster@example.test")  # an alias
        assert code == 250


def test_wrong_password_is_refused(esp: EspServer) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", esp.ports["submissions"], context=esp.client_tls(), timeout=30
    ) as client:
        client.ehlo("laptop")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("alice@example.test", "not the password")
        assert info.value.smtp_code == 535
        client.login("alice@example.test", PASSWORD)  # the session goes on


def test_sender_must_be_owned_on_submission(esp: EspServer) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", esp.ports["submissions"], context=esp.client_tls(), timeout=30
    ) as client:
        client.login("alice@example.test", PASSWORD)
        code, reply = client.mail("bob@example.test")
        assert code == 553 and reply.startswith(b"5.7.1")
        code, reply = client.mail("<>")
        assert code == 553
        code, _ = client.mail("postmaster@example.test")  # alias of alice
        assert code == 250
        client.rset()
        code, _ = client.mail("alice+lists@example.test")
        assert code == 250


def test_messages_over_the_size_limit_are_refused(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.ehlo("client")
        code, reply = client.mail("carol@remote.test", ["SIZE=2000000"])
        assert code == 552 and reply.startswith(b"5.3.4")
        client.mail("carol@remote.test")
        client.rcpt("bob@example.test")
        big = message("too big", body="x" * 80 + "\n")
        big.set_content(("y" * 998 + "\n") * 1100)
        code, reply = client.data(big.as_string().replace("\n", "\r\n").encode())
        assert code == 552 and reply.startswith(b"5.3.4")
        code, _ = client.noop()  # the session survives
        assert code == 250
    assert "too big" not in stored_subjects(esp, "bob@example.test")


def test_one_message_for_several_recipients_is_stored_for_each(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.send_message(
            message("for both"), "carol@remote.test",
            ["bob@example.test", "alice@example.test", "postmaster@example.test"],
        )
    assert stored_subjects(esp, "bob@example.test").count("for both") == 1
    assert stored_subjects(esp, "alice@example.test").count("for both") == 1  # alias deduplicated


def test_over_quota_recipient_is_refused_temporarily(esp: EspServer) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.ehlo("client")
        client.mail("carol@remote.test", ["SIZE=5000"])
        code, reply = client.rcpt("tiny@example.test")
        assert code == 552 and reply.startswith(b"5.2.3")  # larger than the whole quota
        client.rset()
        # Just under the quota as declared; with our Received header it then fills the quota.
        bare = len(message("fits", to="tiny@example.test", body="").as_string().replace("\n", "\r\n"))
        fits = message("fits", to="tiny@example.test", body="x" * (1000 - bare - 40))
        client.send_message(fits, "carol@remote.test", ["tiny@example.test"])
        client.mail("carol@remote.test")
        code, reply = client.rcpt("tiny@example.test")
        assert code == 452 and reply.startswith(b"4.2.2")  # full now; may empty later


def test_a_killed_server_loses_nothing_it_acknowledged(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    server = start_esp(scratch, database_dsn, test_dns.nameserver)
    server.add_user("dave@example.test", "dave's long password")
    client = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
    client.send_message(message("before the crash", to="dave@example.test"),
                        "carol@remote.test", ["dave@example.test"])
    server.process.stop(signal.SIGKILL)  # right after the 250
    client.close()
    restarted = start_esp(scratch, database_dsn, test_dns.nameserver)
    try:
        stored = restarted.messages("dave@example.test")
        assert len(stored) == 1
        _uid, size, filename = stored[0]
        assert len(restarted.message_file("dave@example.test", filename)) == size
        assert len(list((scratch / "var" / "maildir" / "example.test" / "dave" / "new")
                        .iterdir())) == 1
    finally:
        restarted.process.stop()
