"""The filter pipeline with real Rspamd and clamd, rate limits, and a third party's plugin:
verdicts as SMTP replies before the 250, headers and events, and what happens when a scanner
is away."""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import smtplib
import ssl
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from esp.addresses import parse_address
from esp.auth import PasswordHasher
from esp.events import Event
from esp.storage import directory
from esp.storage.db import run_sync
from esp.storage.rules import save_rule_txn
from tests.dnszone import DNSServer
from tests.espserver import FAST_HASHING, EspServer, connection, events_of
from tests.filterservices import EICAR, GTUBE, Service, start_clamd

ALICE = "alice@example.test"


def message(subject: str, body: bytes = b"Hello Alice,\r\nsee you at lunch.\r\n") -> bytes:
    return (b"From: Bob <bob@spf-pass.test>\r\nTo: Alice <alice@example.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.replace(" ", ".")
            .encode() + b"@spf-pass.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
            + body)


def send(port: int, data: bytes, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """MAIL, RCPT, DATA on the MX; the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as client:
        client.ehlo("client.spf-pass.test")
        client.mail("bob@spf-pass.test")
        code, text = client.rcpt(ALICE)
        assert code == 250, text
        code, text = client.data(data)
        return code, text


def stored(scratch: Path, dsn: str) -> list[email.message.EmailMessage]:
    return stored_in(scratch, dsn, "INBOX")


def stored_in(scratch: Path, dsn: str, mailbox: str) -> list[email.message.EmailMessage]:
    server = EspServer(None, dsn, scratch / "var", {})  # type: ignore[arg-type]
    folder = "" if mailbox == "INBOX" else f".{mailbox}"
    found = []
    for _uid, _size, name in server.messages(ALICE, mailbox):
        parsed = email.message_from_bytes(server.message_file(ALICE, name, folder),
                                          policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        found.append(parsed)
    return found


def filters(chain: str, settings: str) -> str:
    return f"filters:\n  chain: [{chain}]\n  settings:\n{settings}"


def of_type(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [dict(e.payload) for e in events if e.type == kind]


@pytest_twisted.ensureDeferred
async def test_rspamd_rejects_gtube_in_the_session_and_passes_a_normal_message(
    scratch: Path, database_dsn: str, test_dns: DNSServer, rspamd: Service,
) -> None:
    replies: list[tuple[int, bytes]] = []

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        replies.append(send(ports["smtp-mx-0"], message("lunch")))
        replies.append(send(ports["smtp-mx-0"], message("offer", b"Buy now!\r\n" + GTUBE
                                                         + b"\r\n")))

    events = await events_of(
        scratch, database_dsn, test_dns.nameserver, [ALICE], client,
        top=filters("rspamd", f"    rspamd: {{url: 'http://127.0.0.1:{rspamd.port}'}}\n"))
    (ok, _), (refused, text) = replies
    assert ok == 250
    assert refused == 554 and b"5.7.1 Gtube pattern" in text  # Rspamd's own words
    (kept,) = stored(scratch, database_dsn)  # the GTUBE message was never stored
    assert kept["Subject"] == "lunch"
    assert kept["X-Spamd-Result"].startswith("default: False [")
    assert float(kept["X-Spam-Score"]) < 15
    (matched,) = of_type(events, "filter.matched")
    assert matched["filter"] == "rspamd" and matched["action"] == "reject"
    assert "GTUBE" in matched["details"]["symbols"]
    (spam,) = of_type(events, "spam.detected")
    assert spam["outcome"] == "reject" and "GTUBE" in spam["symbols"]


def eicar_mail() -> bytes:
    mail = EmailMessage()
    mail["From"] = "bob@spf-pass.test"
    mail["To"] = ALICE
    mail["Subject"] = "invoice"
    mail.set_content("The invoice is attached.")
    mail.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                        filename="invoice.com")
    return mail.as_bytes(policy=email.policy.SMTP)


@pytest_twisted.ensureDeferred
async def test_clamav_rejects_an_eicar_attachment_and_passes_a_clean_message(
    scratch: Path, database_dsn: str, test_dns: DNSServer, clamd: Service,
) -> None:
    replies: list[tuple[int, bytes]] = []

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        replies.append(send(ports["smtp-mx-0"], eicar_mail()))
        replies.append(send(ports["smtp-mx-0"], message("clean")))

    events = await events_of(
        scratch, database_dsn, test_dns.nameserver, [ALICE], client,
        top=filters("clamav",
                    f"    clamav: {{address: 'tcp:host=127.0.0.1:port={clamd.port}'}}\n"))
    (refused, text), (ok, _) = replies
    assert refused == 554 and b"Test.EICAR.NDB" in text and ok == 250
    (kept,) = stored(scratch, database_dsn)
    assert kept["Subject"] == "clean" and kept["X-Virus-Scanned"].startswith("ClamAV")
    (virus,) = of_type(events, "virus.detected")
    assert virus["signature"].startswith("Test.EICAR.NDB")


@pytest_twisted.ensureDeferred
async def test_the_rate_limit_defers_the_message_past_it_and_not_another_client(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    replies: list[int] = []

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        for n in range(4):
            replies.append(send(ports["smtp-mx-0"], message(f"note {n}"))[0])
        replies.append(send(ports["smtp-mx-0"], message("other client"), "127.0.0.2")[0])

    events = await events_of(
        scratch, database_dsn, test_dns.nameserver, [ALICE], client,
        top=filters("ratelimit", "    ratelimit: {per_ip: {count: 3, seconds: 3600}}\n"))
    assert replies == [250, 250, 250, 451, 250]
    assert [m["Subject"] for m in stored(scratch, database_dsn)] == [
        "note 0", "note 1", "note 2", "other client"]
    (matched,) = of_type(events, "filter.matched")
    assert matched["action"] == "defer" and matched["details"]["key"] == "ip:127.0.0.1"


@pytest.mark.parametrize("policy", ["open", "closed"])
@pytest_twisted.ensureDeferred
async def test_a_scanner_that_goes_away_fails_open_or_closed_and_loses_nothing(
    scratch: Path, database_dsn: str, test_dns: DNSServer, policy: str,
) -> None:
    scanner = start_clamd(scratch / "clamd")
    replies: list[int] = []

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        nonlocal scanner
        replies.append(send(ports["smtp-mx-0"], message("before"))[0])
        scanner.stop()
        replies.append(send(ports["smtp-mx-0"], message("while away"))[0])
        scanner = start_clamd(scratch / "clamd", scanner.port)
        replies.append(send(ports["smtp-mx-0"], message("after"))[0])

    try:
        await events_of(
            scratch, database_dsn, test_dns.nameserver, [ALICE], client,
            top=filters("clamav", f"    clamav: {{address: 'tcp:host=127.0.0.1:port="
                        f"{scanner.port}', on_failure: {policy}}}\n"))
    finally:
        scanner.stop()
    subjects = [m["Subject"] for m in stored(scratch, database_dsn)]
    if policy == "open":
        assert replies == [250, 250, 250]
        assert subjects == ["before", "while away", "after"]
    else:
        assert replies == [250, 451, 250]  # the sender keeps it and tries again
        assert subjects == ["before", "after"]


class FakeLLM:
    """An HTTP server in the test that speaks OpenAI's chat-completions wire format; each
    request takes the next behaviour: a category, 'malformed', or 'hang' (no answer until
    the server stops)."""

    def __init__(self, behaviours: list[str]) -> None:
        self.behaviours = list(behaviours)
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                fake.requests.append({"path": self.path,
                                      "authorization": self.headers["Authorization"],
                                      "body": json.loads(self.rfile.read(length))})
                behaviour = fake.behaviours.pop(0)
                if behaviour == "hang":
                    fake.release.wait(120)
                    return
                content = ("I would say promotions" if behaviour == "malformed"
                           else json.dumps({"category": behaviour}))
                answer = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def keywords(dsn: str, address: str) -> list[tuple[str, str, list[str]]]:
    """(mailbox, subject, keywords) of each message of ``address``, in arrival order."""
    local, _, domain = address.partition("@")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT b.name, m.subject, m.keywords FROM messages m "
            "JOIN mailboxes b ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id "
            "JOIN domains d ON d.id = u.domain_id WHERE d.name = %s AND u.localpart = %s "
            "ORDER BY m.id", (domain, local))
        return [(r[0], r[1], list(r[2])) for r in cur.fetchall()]


@pytest_twisted.ensureDeferred
async def test_the_llm_categoriser_sets_a_keyword_and_fails_open(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    llm = FakeLLM(["promotions", "malformed", "hang"])
    replies: list[int] = []
    (scratch / "llm.key").write_text("sk-test-key\n")

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
            cur.execute("UPDATE domains SET settings = '{\"filters\": {\"enabled\": [\"llm\"]}}'"
                        " WHERE name = 'example.test'")
            cur.execute("INSERT INTO domains (name) VALUES ('other.test')")
        hashed = PasswordHasher(FAST_HASHING).hash("a long password")
        with connection(database_dsn) as conn:
            run_sync(conn, directory.add_user_txn, parse_address("bob@other.test"), hashed,
                     scratch / "var" / "maildir")
        for subject in ("Big sale", "Lunch?", "Minutes"):
            replies.append(send(ports["smtp-mx-0"], message(subject))[0])
        with smtplib.SMTP("127.0.0.1", ports["smtp-mx-0"], timeout=60) as smtp:
            smtp.sendmail("bob@spf-pass.test", ["bob@other.test"], message("Not for the LLM"))

    try:
        await events_of(
            scratch, database_dsn, test_dns.nameserver, [ALICE], client,
            top=filters("llm", f"    llm: {{base_url: 'http://127.0.0.1:{llm.port}/v1', "
                        f"api_key_file: '{scratch / 'llm.key'}', timeout: 2, "
                        "folders: {promotions: Archive}}\n"))
    finally:
        llm.stop()
    assert replies == [250, 250, 250]
    assert keywords(database_dsn, ALICE) == [
        ("Archive", "Big sale", ["$Category/Promotions"]),
        ("INBOX", "Lunch?", []),  # a malformed answer: passed on, untouched
        ("INBOX", "Minutes", []),  # no answer in time: passed on
    ]
    assert [s for _, s, _ in keywords(database_dsn, "bob@other.test")] == ["Not for the LLM"]
    # Three requests, none for other.test, which has not turned the LLM on.
    assert len(llm.requests) == 3
    first = llm.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["authorization"] == "Bearer sk-test-key"
    text = json.dumps(first["body"]["messages"])
    assert "Big sale" in text and "Hello Alice" in text
    assert all("Not for the LLM" not in json.dumps(r["body"]) for r in llm.requests)


@pytest_twisted.ensureDeferred
async def test_a_users_rules_file_mark_discard_and_forward(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    replies: list[int] = []

    def client(ports: dict[str, int], _: ssl.SSLContext) -> None:
        with connection(database_dsn) as conn:
            user_id = run_sync(conn, lambda cur: cur.execute(
                "SELECT id FROM users WHERE localpart = 'alice'") or cur.fetchone()[0])
            for name, priority, conditions, actions in (
                ("newsletters", 1,
                 [{"field": "list-id", "op": "contains", "value": "News.Example"}],
                 [{"type": "fileinto", "mailbox": "Archive"},
                  {"type": "keyword", "keyword": "$Newsletter"}, {"type": "seen"}]),
                ("drop", 2, [{"field": "subject", "op": "starts_with", "value": "drop me"}],
                 [{"type": "discard"}, {"type": "stop"}]),
                ("forward", 3, [{"field": "subject", "op": "contains", "value": "fwd"}],
                 [{"type": "forward", "to": "carol@remote.test"}, {"type": "flag"}]),
                ("never", 4, [{"field": "size", "op": "over", "value": 10_000_000}],
                 [{"type": "discard"}]),
            ):
                run_sync(conn, save_rule_txn, user_id, None, name, priority, True, "all",
                         conditions, actions)
        replies.append(send(ports["smtp-mx-0"], message("Weekly digest").replace(
            b"Subject:", b"List-Id: <weekly.news.example.org>\r\nSubject:"))[0])
        replies.append(send(ports["smtp-mx-0"], message("drop me please"))[0])
        replies.append(send(ports["smtp-mx-0"], message("please fwd this"))[0])

    await events_of(scratch, database_dsn, test_dns.nameserver, [ALICE], client)
    assert replies == [250, 250, 250]
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT b.name, m.subject, m.keywords, m.seen, m.flagged FROM messages m "
                    "JOIN mailboxes b ON b.id = m.mailbox_id ORDER BY m.id")
        assert cur.fetchall() == [
            ("Archive", "Weekly digest", ["$Newsletter"], True, False),
            ("INBOX", "please fwd this", [], False, True),
        ]
        cur.execute("SELECT r.address, m.sender FROM queue_recipients r JOIN queue q "
                    "ON q.id = r.queue_id JOIN outbound_messages m ON m.id = q.message_id")
        assert cur.fetchall() == [("carol@remote.test", "bob@spf-pass.test")]


@pytest_twisted.ensureDeferred
async def test_quarantined_mail_goes_to_junk_and_is_never_sent_on(
    scratch: Path, database_dsn: str, test_dns: DNSServer, clamd: Service,
) -> None:
    replies: list[int] = []

    def client(ports: dict[str, int], context: ssl.SSLContext) -> None:
        # A forged scan result from the sender does not survive.
        replies.append(send(ports["smtp-mx-0"], b"X-Virus-Scanned: clean, trust me\r\n"
                            + eicar_mail())[0])
        with smtplib.SMTP_SSL("127.0.0.1", ports["smtp-submissions-0"], context=context,
                              timeout=30) as smtp:
            smtp.login(ALICE, "a long password")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail(ALICE, ["carol@remote.test"], eicar_mail())
            replies.append(refused.value.smtp_code)

    events = await events_of(
        scratch, database_dsn, test_dns.nameserver, [ALICE], client,
        top=filters("clamav", f"    clamav: {{address: 'tcp:host=127.0.0.1:port={clamd.port}',"
                    " on_virus: quarantine}\n"))
    assert replies == [250, 554]
    assert [(box, subject) for box, subject, _ in keywords(database_dsn, ALICE)] == [
        ("Junk", "invoice")]
    (kept,) = stored_in(scratch, database_dsn, "Junk")
    assert kept.get_all("X-Virus-Scanned") is None
    assert kept["X-Virus"].startswith("Test.EICAR.NDB")
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM queue")
        assert cur.fetchone() == (0,)
    assert [v["recipients"] for v in of_type(events, "virus.detected")] == [
        [ALICE], ["carol@remote.test"]]
