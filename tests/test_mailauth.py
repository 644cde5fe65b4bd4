"""SPF, DKIM and DMARC on the MX against a real DNS server with test zones, seen in
Authentication-Results and in what ESP accepts, quarantines or refuses."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from tests.dnszone import SELECTOR, DNSServer
from tests.espserver import EspServer, connection, start_esp

REPORT_ONLY = (
    "  mailauth: {enforce_dmarc: false, reject_spf_fail: false}\n"
)


@pytest.fixture(scope="module")
def enforcing(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer
              ) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("bob@example.test", "bob's long password")
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def reporting(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer,
              enforcing: EspServer) -> Iterator[EspServer]:
    """A second ESP on the same database that reports but does not act on the results."""
    directory = module_scratch / "report-only"
    directory.mkdir()
    server = start_esp(directory, module_database_dsn, test_dns.nameserver,
                       extra=REPORT_ONLY)
    yield server
    server.process.stop()


def build(sender: str, subject: str, body: str = "Hello Bob.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "bob@example.test"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def signed(test_dns: DNSServer, sender: str, subject: str) -> bytes:
    raw = build(sender, subject)
    domain = sender.rpartition("@")[2].encode()
    signature = dkim.sign(raw, SELECTOR.encode(), domain, test_dns.private_key_pem,
                          include_headers=[b"from", b"to", b"subject"])
    return signature + raw


def send(esp: EspServer, sender: str, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.ehlo("mail.sender.test")
        client.mail(sender)
        code, reply = client.rcpt("bob@example.test")
        assert code == 250, reply
        return client.data(raw)


def delivered(esp: EspServer, subject: str, folder: str = "") -> bytes:
    mailbox = "Junk" if folder == ".Junk" else "INBOX"
    for _uid, _size, filename in reversed(esp.messages("bob@example.test", mailbox)):
        data = esp.message_file("bob@example.test", filename, folder)
        if f"Subject: {subject}\r\n".encode() in data:
            return data
    raise AssertionError(f"no message {subject!r} in {mailbox}")


def results(data: bytes) -> str:
    """Our Authentication-Results header, unfolded."""
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    first = next(i for i, line in enumerate(lines)
                 if line.startswith("Authentication-Results: mx.example.test;"))
    block = [lines[first]]
    for line in lines[first + 1 :]:
        if not line.startswith(("\t", " ")):
            break
        block.append(line.strip())
    return " ".join(block)


@pytest.mark.parametrize(
    "domain, spf",
    [("spf-pass.test", "pass"), ("spf-softfail.test", "softfail"), ("spf-none.test", "none")],
)
def test_spf_results_are_reported(enforcing: EspServer, domain: str, spf: str) -> None:
    sender = f"alice@{domain}"
    code, _ = send(enforcing, sender, build(sender, f"spf {domain}"))
    assert code == 250
    report = results(delivered(enforcing, f"spf {domain}"))
    assert f"spf={spf} smtp.mailfrom=alice@{domain}" in report
    assert "dkim=none" in report
    assert f"dmarc=none header.from={domain}" in report


def test_spf_fail_without_dmarc_is_refused(enforcing: EspServer) -> None:
    code, reply = send(enforcing, "alice@spf-fail.test", build("alice@spf-fail.test", "x"))
    assert code == 550 and reply.startswith(b"5.7.23")


def test_spf_fail_is_reported_when_not_enforced(reporting: EspServer) -> None:
    code, _ = send(reporting, "alice@spf-fail.test", build("alice@spf-fail.test", "spf fail"))
    assert code == 250
    assert "spf=fail smtp.mailfrom=alice@spf-fail.test" in results(
        delivered(reporting, "spf fail"))


def test_dkim_pass_aligns_dmarc_despite_spf_fail(enforcing: EspServer, test_dns: DNSServer
                                                 ) -> None:
    raw = signed(test_dns, "alice@dkim.test", "dkim signed")
    code, _ = send(enforcing, "alice@dkim.test", raw)
    assert code == 250
    report = results(delivered(enforcing, "dkim signed"))
    assert "spf=fail" in report
    assert "dkim=pass header.d=dkim.test header.s=sel header.b=" in report
    assert "dmarc=pass (p=reject dis=none) header.from=dkim.test" in report


def test_dkim_fail_when_the_body_was_altered(
    enforcing: EspServer, reporting: EspServer, test_dns: DNSServer
) -> None:
    raw = signed(test_dns, "alice@dkim.test", "dkim altered").replace(b"Hello", b"Jello")
    code, reply = send(enforcing, "alice@dkim.test", raw)
    assert code == 550 and reply.startswith(b"5.7.1") and b"DMARC" in reply
    code, _ = send(reporting, "alice@dkim.test", raw)
    assert code == 250
    report = results(delivered(reporting, "dkim altered"))
    assert "dkim=fail header.d=dkim.test" in report
    assert "dmarc=fail (p=reject dis=reject) header.from=dkim.test" in report


def test_dmarc_reject_refuses_in_the_session(enforcing: EspServer) -> None:
    sender = "alice@dmarc-reject.test"
    code, reply = send(enforcing, sender, build(sender, "dmarc reject"))
    assert code == 550 and reply.startswith(b"5.7.1")
    assert b"DMARC policy of dmarc-reject.test" in reply


def test_dmarc_quarantine_goes_to_junk(enforcing: EspServer) -> None:
    sender = "alice@dmarc-quarantine.test"
    code, _ = send(enforcing, sender, build(sender, "dmarc quarantine"))
    assert code == 250
    report = results(delivered(enforcing, "dmarc quarantine", folder=".Junk"))
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=dmarc-quarantine.test" in report


def test_spf_alignment_passes_dmarc(enforcing: EspServer) -> None:
    sender = "alice@dmarc-pass.test"
    code, _ = send(enforcing, sender, build(sender, "dmarc by spf"))
    assert code == 250
    report = results(delivered(enforcing, "dmarc by spf"))
    assert "spf=pass" in report and "dmarc=pass" in report


def test_forged_results_with_our_name_are_removed(enforcing: EspServer) -> None:
    sender = "alice@spf-pass.test"
    raw = (b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
           b"Authentication-Results: other.test; spf=pass\r\n" + build(sender, "forged"))
    assert send(enforcing, sender, raw)[0] == 250
    data = delivered(enforcing, "forged")
    assert data.count(b"Authentication-Results: mx.example.test;") == 1
    assert b"bank.test" not in data
    assert b"Authentication-Results: other.test; spf=pass" in data


def test_quarantine_follows_the_junk_mailbox_when_renamed(enforcing: EspServer) -> None:
    enforcing.add_user("fay@example.test", "fay's long password")
    with connection(enforcing.dsn) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE mailboxes SET name = 'Spam' FROM users "
            "WHERE users.id = mailboxes.user_id AND users.localpart = 'fay' "
            "AND mailboxes.special_use = '\\Junk'"
        )
    sender = "alice@dmarc-quarantine.test"
    with smtplib.SMTP("127.0.0.1", enforcing.ports["mx"], timeout=30) as client:
        client.sendmail(sender, ["fay@example.test"], build(sender, "to spam"))
    assert len(enforcing.messages("fay@example.test", "Spam")) == 1
    assert enforcing.messages("fay@example.test", "INBOX") == []
