"""DKIM keys made and shown by the CLI, stored encrypted, and outgoing submissions signed with
them (RSA and Ed25519): the records the CLI prints verify the signatures with dkimpy."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import psycopg2
import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.helpers import run_esp

PASSWORD = "dora's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("dora@example.test", PASSWORD)
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def generated(esp: EspServer) -> list[str]:
    """``esp dkim generate`` for an RSA and an Ed25519 key; what each printed."""
    outputs = []
    for extra in ((), ("--algorithm", "ed25519")):
        code, out, err = cli(esp, "dkim", "generate", "example.test", *extra)
        assert code == 0, err
        outputs.append(out)
    return outputs


def cli(esp: EspServer, *args: str) -> tuple[int, str, str]:
    result = run_esp(*args, config=esp.data_dir.parent / "esp.yaml")
    return result.returncode, result.stdout, result.stderr


def published(esp: EspServer) -> dict[bytes, bytes]:
    """The TXT records ``esp dkim show`` says to publish, as a resolver would return them."""
    code, out, err = cli(esp, "dkim", "show", "example.test")
    assert code == 0, err
    records = {}
    for line in out.splitlines():
        name, _, rest = line.partition(". IN TXT ")
        records[name.encode() + b"."] = "".join(re.findall(r'"([^"]*)"', rest)).encode()
    return records


def submit(esp: EspServer, author: str, subject: str) -> bytes:
    """Submit a message from dora to a remote recipient; return it as spooled for delivery."""
    message = EmailMessage()
    message["From"] = author
    message["To"] = "friend@remote.test"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@example.test>"
    message.set_content("Hello,\r\nsee you soon.\r\n")
    with smtplib.SMTP("127.0.0.1", esp.ports["submission"], timeout=30) as client:
        client.starttls(context=esp.client_tls())
        client.login("dora@example.test", PASSWORD)
        client.send_message(message, "dora@example.test", ["friend@remote.test"])
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT spool_name FROM outbound_messages ORDER BY id DESC LIMIT 1")
        row = cur.fetchone()
    assert row is not None
    return (esp.data_dir / "spool" / "new" / row[0]).read_bytes()


def test_keys_are_generated_shown_and_kept_encrypted(
    esp: EspServer, generated: list[str]
) -> None:
    rsa_out, ed_out = generated
    assert "esp._domainkey.example.test. IN TXT" in rsa_out and "k=rsa" in rsa_out
    assert "esp-ed25519._domainkey.example.test. IN TXT" in ed_out and "k=ed25519" in ed_out
    records = published(esp)
    assert set(records) == {b"esp._domainkey.example.test.",
                            b"esp-ed25519._domainkey.example.test."}
    # Refused: the same selector twice, a domain not hosted here.
    assert cli(esp, "dkim", "generate", "example.test")[0] != 0
    code, _, err = cli(esp, "dkim", "generate", "elsewhere.test")
    assert code != 0 and "not a hosted domain" in err
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT private_key FROM dkim_keys")
        sealed = [bytes(row[0]) for row in cur.fetchall()]
    assert len(sealed) == 2
    assert not any(b"PRIVATE KEY" in key for key in sealed)
    secret = esp.data_dir / "dkim-secret.key"
    assert secret.stat().st_mode & 0o077 == 0 and len(secret.read_bytes()) == 32


def test_submissions_to_remote_recipients_are_signed(
    esp: EspServer, generated: list[str]
) -> None:
    records = published(esp)
    spooled = submit(esp, "Dora <dora@example.test>", "signed twice")
    signatures = re.findall(rb"(?im)^dkim-signature:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", spooled)
    assert len(signatures) == 2
    tags = [dict(re.findall(rb"(\w+)=([^;]*)", re.sub(rb"\s+", b"", s.split(b":", 1)[1])))
            for s in signatures]
    assert {t[b"a"] for t in tags} == {b"rsa-sha256", b"ed25519-sha256"}
    for t in tags:
        assert t[b"d"] == b"example.test" and t[b"c"] == b"relaxed/relaxed"
        assert t[b"h"].lower().split(b":").count(b"from") == 2  # From oversigned

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    def verifies(message: bytes, index: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            return False

    assert verifies(spooled, 0) and verifies(spooled, 1)
    altered = spooled.replace(b"see you soon", b"see you never")
    assert not verifies(altered, 0) and not verifies(altered, 1)


def test_a_from_of_another_domain_is_not_signed(esp: EspServer, generated: list[str]) -> None:
    spooled = submit(esp, "someone@elsewhere.test", "not ours to sign")
    assert b"DKIM-Signature" not in spooled
