"""Events leave the process: a message delivered over SMTP becomes a signed webhook call
(checked with the standardwebhooks library, as a receiver would), retried until the receiver
is back, never lost when ESP is killed before dispatching, never sent to private addresses."""

from __future__ import annotations

import http.server
import imaplib
import json
import signal
import smtplib
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import standardwebhooks
from prometheus_client.parser import text_string_to_metric_families

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.helpers import assert_matches_schema, wait_for_logs
from tests.test_api import call, login

ROOT_PASSWORD = "root's long password"
WEBHOOKS = ("events:\n  webhooks:\n    allow_networks: ['127.0.0.0/8']\n"
            "    retry_schedule: [0.2, 0.2, 0.2, 0.2]\n")


class Receiver:
    """An HTTP receiver on loopback; answers each request with the next status of ``answers``
    (200 once they run out); ``got`` is set at each request."""

    def __init__(self, answers: list[int], port: int = 0) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.invalid: list[str] = []  # bodies not valid under docs/schemas/events
        self.got = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                try:
                    assert_matches_schema(json.loads(body))
                except AssertionError as e:
                    receiver.invalid.append(str(e))
                with receiver.got:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()},
                                              body))
                    receiver.got.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int) -> None:
        with self.got:
            assert self.got.wait_for(lambda: len(self.requests) >= count, timeout=60), (
                f"{len(self.requests)} of {count} webhook calls arrived")
        assert not self.invalid, self.invalid

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver([])
    yield made
    made.stop()


def start(scratch: Path, dsn: str, dns: str, extra: str = "") -> EspServer:
    esp = start_esp(scratch, dsn, dns, top=WEBHOOKS + extra)
    return esp


def make_hook(esp: EspServer, url: str,
              event_types: tuple[str, ...] = ("message.*",)) -> tuple[int, str]:
    esp.add_user("root@example.test", ROOT_PASSWORD)
    esp.add_user("alice@example.test", "alice's long password")
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET role = 'superadmin' WHERE localpart = 'root'")
    token = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
    status, hook = call(esp, "POST", "/api/v1/webhooks", {
        "url": url, "event_types": list(event_types), "domain": "example.test"}, token)
    assert status == 201, hook
    return hook["id"], hook["secret"]


def send(esp: EspServer, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=60) as client:
        client.sendmail("bob@spf-pass.test", ["alice@example.test"],
                        f"From: bob@spf-pass.test\r\nSubject: {subject}\r\n\r\nhello\r\n")


def test_a_delivery_becomes_a_webhook_call_a_receiver_can_verify(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        _, secret = make_hook(esp, f"http://127.0.0.1:{receiver.port}/hook")
        send(esp, "hello webhook")
        receiver.wait(1)
    finally:
        esp.process.stop()
    headers, body = receiver.requests[0]
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "message.received"
    data = payload["data"]
    assert data["user"] == "alice@example.test" and data["domain"] == "example.test"
    assert data["uid"] == 1 and data["mailbox"] == "INBOX" and data["size"] > 0
    assert headers["webhook-id"] == data["id"]
    other = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(other).verify(body, headers)


def test_retries_reach_a_receiver_that_failed_then_was_down(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    receiver = Receiver([500])
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        hook_id, _ = make_hook(esp, f"http://127.0.0.1:{receiver.port}/hook")
        send(esp, "keep trying")
        receiver.wait(1)  # answered 500
        port = receiver.port
        receiver.stop()  # down
        esp.process.wait_for("failed (", count=2)  # the 500, then no answer
        receiver = Receiver([], port)  # back
        receiver.wait(1)
        token = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
        status, page = call(esp, "GET", f"/api/v1/webhooks/{hook_id}/deliveries", token=token)
    finally:
        receiver.stop()
        esp.process.stop()
    assert status == 200
    (delivery,) = page["items"]
    assert delivery["status"] == "delivered" and delivery["event_type"] == "message.received"
    statuses = [t["status"] for t in delivery["tries"]]
    assert statuses[0] == 500 and statuses[-1] == 200 and None in statuses
    (headers, _), = receiver.requests
    assert headers["webhook-id"] == delivery["event_id"]


def test_mailbox_creation_and_expunges_leave_with_their_change(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        make_hook(esp, f"http://127.0.0.1:{receiver.port}/hook",
                  ("mailbox.created", "message.deleted"))
        send(esp, "to be expunged")
        context = ssl.create_default_context(cafile=str(esp.certificate))
        context.check_hostname = False
        with imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=context) as imap:
            imap.login("alice@example.test", "alice's long password")
            assert imap.create("Projects/2026")[0] == "OK"
            imap.select("INBOX")
            imap.store("1", "+FLAGS", "(\\Deleted)")
            assert imap.expunge()[0] == "OK"
        receiver.wait(3)
    finally:
        esp.process.stop()
    seen = sorted((body["type"], body["data"].get("mailbox"), body["data"].get("uid"))
                  for _, body in ((h, json.loads(b)) for h, b in receiver.requests))
    assert seen == [("mailbox.created", "Projects", None),
                    ("mailbox.created", "Projects/2026", None),
                    ("message.deleted", "INBOX", 1)]
    deleted = next(json.loads(b) for _, b in receiver.requests if b"message.deleted" in b)
    assert deleted["data"]["reason"] == "expunge" and deleted["data"]["actor"] == \
        "alice@example.test"


def test_a_410_disables_the_webhook_with_an_audit_line_and_an_event(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    gone = Receiver([410])
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        hook_id, _ = make_hook(esp, f"http://127.0.0.1:{gone.port}/hook")
        token = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
        status, _ = call(esp, "POST", "/api/v1/webhooks", {
            "url": f"http://127.0.0.1:{receiver.port}/watch",
            "event_types": ["webhook.*"]}, token)
        assert status == 201
        send(esp, "answered with 410")
        receiver.wait(1)
        status, hook = call(esp, "GET", f"/api/v1/webhooks/{hook_id}", token=token)
    finally:
        gone.stop()
        esp.process.stop()
    assert status == 200 and hook["enabled"] is False and "410" in hook["disabled_reason"]
    body = json.loads(receiver.requests[0][1])
    assert body["type"] == "webhook.disabled" and body["data"]["webhook_id"] == hook_id
    assert body["data"]["domain"] == "example.test"
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, target, details->>'reason' FROM audit_log "
                    "WHERE action = 'webhook.disable'")
        assert cur.fetchall() == [("esp", str(hook_id), hook["disabled_reason"])]


def test_an_event_committed_before_a_crash_is_delivered_after_the_restart(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    # First run: no dispatcher in this process (webhooks off), so nothing is sent before
    # the kill; the event is in the outbox with the message.
    esp = start(scratch, database_dsn, test_dns.nameserver)
    esp.process.stop()
    off = WEBHOOKS.replace("  webhooks:\n", "  webhooks:\n    enabled: false\n")
    esp = start_esp(scratch, database_dsn, test_dns.nameserver, top=off)
    make_hook(esp, f"http://127.0.0.1:{receiver.port}/hook")
    send(esp, "survives a crash")
    esp.process.stop(signal.SIGKILL)
    assert receiver.requests == []
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        receiver.wait(1)
    finally:
        esp.process.stop()
    body = json.loads(receiver.requests[0][1])
    assert body["type"] == "message.received" and body["data"]["user"] == "alice@example.test"


def test_webhooks_to_private_or_metadata_addresses_are_refused(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        make_hook(esp, "http://127.0.0.1:9/allowed-by-config")
        token = login(esp, "root@example.test", ROOT_PASSWORD)["access_token"]
        for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data",
                    "http://192.168.0.10:8080/", "http://[::1]:8080/", "http://[fd00::1]/",
                    "http://0.0.0.0/", "ftp://example.com/"):
            status, body = call(esp, "POST", "/api/v1/webhooks", {
                "url": url, "event_types": ["message.*"]}, token)
            assert status in (400, 422), (url, body)
    finally:
        esp.process.stop()


def scrape(esp: EspServer) -> dict[str, float]:
    """/metrics parsed with prometheus-client's own parser: {"name{label=value,...}": value}."""
    with urllib.request.urlopen(
            f"http://127.0.0.1:{esp.ports['metrics']}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def test_metrics_add_up_every_worker_process(
    scratch: Path, database_dsn: str, test_dns: DNSServer,
) -> None:
    esp = start_esp(scratch, database_dsn, test_dns.nameserver, workers=2)
    try:
        esp.process.wait_for(" ready: ", count=2)  # the worker too
        esp.add_user("alice@example.test", "alice's long password")
        sent = 0
        # New connections until the worker process has taken one (the kernel chooses which
        # process accepts each); the parent's log carries the worker's lines.
        while not any("worker 1:" in line and "accepted" in line for line in esp.process.lines):
            assert sent < 200, "the worker never accepted a connection"
            send(esp, f"message {sent}")
            sent += 1
            esp.process.wait_for("accepted", count=sent)
        after = scrape(esp)
    finally:
        esp.process.stop()
    assert after["esp_messages_received_total{}"] == sent  # both processes' counts
    assert after["esp_events_total{type=message.received}"] == sent


def test_metrics_move_with_a_delivery_a_login_and_a_webhook_call(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    esp = start(scratch, database_dsn, test_dns.nameserver)
    try:
        make_hook(esp, f"http://127.0.0.1:{receiver.port}/hook")
        before = scrape(esp)
        send(esp, "counted")
        esp.process.wait_for("delivered (200")  # logged once it is counted
        context = ssl.create_default_context(cafile=str(esp.certificate))
        context.check_hostname = False
        with imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=context) as imap:
            imap.login("alice@example.test", "alice's long password")
            during = scrape(esp)
        with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=60) as client:
            client.ehlo("client.test")
            client.mail("bob@spf-pass.test")
            assert client.rcpt("nobody@example.test")[0] == 550
        after = scrape(esp)
    finally:
        esp.process.stop()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("esp_messages_received_total{}") == 1
    assert grew("esp_events_total{type=message.received}") == 1
    assert grew("esp_logins_total{outcome=success,protocol=imap}") == 1
    assert grew("esp_webhook_deliveries_total{outcome=delivered}") == 1
    assert grew("esp_webhook_seconds_count{}") == 1
    assert grew("esp_smtp_rejected_total{stage=rcpt,status=5.1.1}") == 1
    assert during["esp_sessions_open{protocol=imap}"] == 1
    assert after["esp_sessions_open{protocol=imap}"] == 0
    assert "esp_db_connections_in_use{}" in after and "esp_queue_depth{}" in after


def test_two_nodes_deliver_a_thousand_events_none_lost(
    scratch: Path, database_dsn: str, test_dns: DNSServer, receiver: Receiver,
) -> None:
    shared = WEBHOOKS.replace("    retry_schedule:", "    concurrency: 32\n    retry_schedule:")
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    first = start_esp(scratch / "a", database_dsn, test_dns.nameserver, top=shared)
    second = start_esp(scratch / "b", database_dsn, test_dns.nameserver, top=shared)
    try:
        make_hook(first, f"http://127.0.0.1:{receiver.port}/hook")
        sent: list[int] = []

        def load() -> None:
            for node in (first, second):
                with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=60) as client:
                    for n in range(500):
                        client.sendmail("bob@spf-pass.test", ["alice@example.test"],
                                        f"Subject: {n}\r\n\r\nhello\r\n")
                        sent.append(n)

        sender = threading.Thread(target=load)
        sender.start()
        # Both servers log every delivery and webhook call: their logs are read meanwhile.
        wait_for_logs([first.process, second.process],
                      lambda: len(receiver.requests) >= 1000, "1,000 webhook calls",
                      timeout=300)
        sender.join(60)
        assert len(sent) == 1000
        with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
            statuses = dict(cur.fetchall())
    finally:
        first.process.stop()
        second.process.stop()
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(set(ids)) == 1000  # none lost
    # Any duplicate is a repeat of the same event, with the same id and body.
    bodies: dict[str, bytes] = {}
    for headers, body in receiver.requests:
        assert bodies.setdefault(headers["webhook-id"], body) == body
    assert statuses == {"delivered": 1000}
