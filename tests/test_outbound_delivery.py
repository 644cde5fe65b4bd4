"""End to end through `twistd esp`: a message submitted on 587 goes out through MX lookup to a
remote MX (smtp-sink on its own loopback address) DKIM-signed, and dkimpy and opendkim both
verify the copy the remote received against the test zone; a hard bounce comes back to the
sender's INBOX and suppresses the address at submission until an operator removes it."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from tests.dnszone import free_dns_port, serve_zones, txt_record, zone_file
from tests.espserver import EspServer, connection, start_esp
from tests.helpers import program, run_esp, wait_for_logs
from tests.sink import Sink, start_sink

PASSWORD = "dora's long password"


@dataclass
class Setup:
    esp: EspServer
    sink: Sink  # mx.remote.test, 127.0.0.2: takes everything
    rejecting: Sink  # mx.reject.test, 127.0.0.4: refuses every recipient
    zones: list[Path]
    config: Path
    dns_port: int


def wait_for(setup: Setup, condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition``, checked each time ESP logs (it logs every delivery attempt,
    so the sink's dumps and the queue change only just before a log line)."""
    wait_for_logs([setup.esp.process], condition, what)


@pytest.fixture(scope="module")
def setup(module_scratch: Path, module_database_dsn: str) -> Iterator[Setup]:
    sink = start_sink(module_scratch / "sink", "127.0.0.2")
    rejecting = start_sink(module_scratch / "rejecting", "127.0.0.4", port=sink.port, options=[
        "-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: User unknown"])
    dns_port = free_dns_port()
    esp = start_esp(
        module_scratch, module_database_dsn, f"127.0.0.1:{dns_port}",
        outbound=f"    port: {sink.port}\n    poll_interval: 1\n",
    )
    esp.add_user("dora@example.test", PASSWORD)
    config = module_scratch / "esp.yaml"
    generated = run_esp("dkim", "generate", "example.test", config=config)
    assert generated.returncode == 0, generated.stderr
    name, _, rest = generated.stdout.splitlines()[1].partition(". IN TXT ")
    key = "".join(re.findall(r'"([^"]*)"', rest))
    zones_dir = module_scratch / "zones"
    zones_dir.mkdir()
    zones = [
        zone_file(zones_dir, "example.test", [txt_record(name, key)]),
        zone_file(zones_dir, "remote.test", ["MX('remote.test', 10, 'mx.remote.test')",
                                             "A('mx.remote.test', '127.0.0.2')"]),
        zone_file(zones_dir, "reject.test", ["MX('reject.test', 10, 'mx.reject.test')",
                                             "A('mx.reject.test', '127.0.0.4')"]),
    ]
    dns_server = serve_zones(zones_dir, zones, dns_port)
    made = Setup(esp, sink, rejecting, zones, config, dns_port)
    yield made
    esp.process.stop()
    dns_server.terminate()
    dns_server.wait(timeout=30)
    made.sink.stop()
    made.rejecting.stop()  # a test may have started another in its place


def submit(esp: EspServer, to: str, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "Dora <dora@example.test>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@example.test>"
    message.set_content("Hello,\n.see you soon.\n")
    with smtplib.SMTP("127.0.0.1", esp.ports["submission"], timeout=30) as client:
        client.starttls(context=esp.client_tls())
        client.login("dora@example.test", PASSWORD)
        client.send_message(message, "dora@example.test", [to])


def received_by(sink: Sink, subject: str) -> bytes | None:
    for message in sink.messages():
        if f"Subject: {subject}\r\n".encode() in message:
            return message
    return None


def opendkim_verify(message: bytes, zones: list[Path], work: Path) -> subprocess.CompletedProcess[
        str]:
    """``opendkim-testmsg`` on ``message``, resolving through the test zones: it uses the libc
    resolver (port 53 of /etc/resolv.conf), so it runs in a private network and mount
    namespace where a DNS server with the zones listens on 127.0.0.1:53."""
    binary = shutil.which("opendkim-testmsg")
    assert binary, "opendkim-testmsg is missing: apt-get install opendkim-tools"
    assert shutil.which("unshare") and shutil.which("ip"), "unshare (util-linux) and ip " \
        "(iproute2) are needed to give opendkim its own resolver"
    work.mkdir(exist_ok=True)
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (work / "message.eml").write_bytes(message)
    script = work / "verify.py"
    script.write_text(
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from tests.dnszone import serve_zones\n"
        "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
        f"subprocess.run(['mount', '--bind', {str(work / 'resolv.conf')!r}, "
        "'/etc/resolv.conf'], check=True)\n"
        f"zones = [Path(p) for p in {[str(z) for z in zones]!r}]\n"
        f"dns = serve_zones(Path({str(work)!r}), zones, 53)\n"
        f"with open({str(work / 'message.eml')!r}, 'rb') as message:\n"
        f"    result = subprocess.run([{binary!r}], stdin=message, capture_output=True)\n"
        "dns.terminate()\n"
        "sys.stderr.write(result.stderr.decode())\n"
        "sys.exit(result.returncode)\n"
    )
    return subprocess.run(
        ["unshare", "--mount", "--net", sys.executable, str(script)],
        capture_output=True, text=True, timeout=120,
        env={"PATH": f"{Path(program('twistd')).parent}:/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_a_submission_reaches_the_remote_mx_signed_and_both_verifiers_agree(
    setup: Setup,
) -> None:
    submit(setup.esp, "friend@remote.test", "signed and delivered")
    wait_for(setup, lambda: received_by(setup.sink, "signed and delivered") is not None,
             "delivery to the MX")
    received = received_by(setup.sink, "signed and delivered")
    assert received is not None
    assert b"X-Rcpt-Args: <friend@remote.test>" in received
    assert b"X-Helo-Args: mx.example.test" in received
    # The submission had no Date: the MSA added one (RFC 6409 §8.3), and signed it.
    assert re.search(rb"\r\nDate: \w{3}, \d+ \w{3} \d{4} ", received)
    signature = re.search(rb"DKIM-Signature:(.*?)\r\n(?! )(?!\t)", received, re.S)
    assert signature is not None
    tags = {k.strip(): v for k, _, v in (t.partition(b"=") for t in re.sub(
        rb"\s+", b"", signature.group(1)).split(b";"))}
    assert (tags[b"a"], tags[b"c"], tags[b"d"], tags[b"s"]) == (
        b"rsa-sha256", b"relaxed/relaxed", b"example.test", b"esp")
    assert b"date" in tags[b"h"].split(b":")
    assert b"\r\n..see you soon." not in received and b"\r\n.see you soon." in received

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = setup.dns_port
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(answer[0].strings)

    assert dkim.verify(received, dnsfunc=dnsfunc)
    verified = opendkim_verify(received, setup.zones, setup.config.parent / "opendkim")
    assert verified.returncode == 0, verified.stderr
    tampered = received.replace(b"Hello,", b"Hullo,")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)
    refused = opendkim_verify(tampered, setup.zones, setup.config.parent / "opendkim")
    assert refused.returncode != 0 and "Bad signature" in refused.stderr
    with connection(setup.esp.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM queue")
        assert cur.fetchall() == [("sent",)]


def test_a_hard_bounce_reports_to_the_sender_and_suppresses_until_removed(
    setup: Setup,
) -> None:
    submit(setup.esp, "nobody@reject.test", "to a closed mailbox")

    def reports() -> list[tuple[int, int, str]]:
        return setup.esp.messages("dora@example.test")

    wait_for(setup, lambda: len(reports()) == 1, "the bounce report in dora's INBOX")
    [(_, _, filename)] = reports()
    report = setup.esp.message_file("dora@example.test", filename)
    assert b"report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; nobody@reject.test" in report
    assert b"Diagnostic-Code: smtp; 550 5.1.1 Recipient address rejected" in report
    assert b"Subject: to a closed mailbox" in report

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        submit(setup.esp, "nobody@reject.test", "again")
    code, text = refused.value.recipients["nobody@reject.test"]
    assert code == 550 and b"suppression list of example.test" in text

    listed = run_esp("suppression", "list", config=setup.config)
    assert listed.returncode == 0 and "example.test\tnobody@reject.test" in listed.stdout
    removed = run_esp("suppression", "remove", "example.test", "nobody@reject.test",
                      config=setup.config)
    assert removed.returncode == 0, removed.stderr
    again = run_esp("suppression", "remove", "example.test", "nobody@reject.test",
                    config=setup.config)
    assert again.returncode == 1
    submit(setup.esp, "nobody@reject.test", "accepted again")  # no longer refused


def test_operators_see_and_drive_the_queue(setup: Setup) -> None:
    # A message for a destination that is down waits in the queue.
    setup.rejecting.stop()
    try:
        submit(setup.esp, "later@reject.test", "waiting in the queue")
        def waiting() -> str:
            listed = run_esp("queue", "list", config=setup.config).stdout
            return "".join(line for line in listed.splitlines() if "later@reject.test" in line)

        wait_for(setup, lambda: "queued" in waiting() and "attempts 1" in waiting(),
                 "a failed first attempt")
        line = waiting()
        queue_id = int(line.split("\t")[0])
        assert "cannot connect to 127.0.0.4" in line
        shown = run_esp("queue", "show", str(queue_id), "--headers", config=setup.config)
        assert shown.returncode == 0 and "Subject: waiting in the queue" in shown.stdout
        retried = run_esp("queue", "retry", str(queue_id), config=setup.config)
        assert retried.returncode == 0 and "1 entries due now" in retried.stdout
        wait_for(setup, lambda: "queued" in waiting() and "attempts 2" in waiting(),
                 "the retry")
        flushed = run_esp("queue", "flush", config=setup.config)
        # Every waiting entry (the one here, and any other for this closed MX).
        assert flushed.returncode == 0 and re.fullmatch(r"[1-9]\d* entries due now\n",
                                                        flushed.stdout)
        wait_for(setup, lambda: "queued" in waiting() and "attempts 3" in waiting(),
                 "the flush")
        deleted = run_esp("queue", "delete", str(queue_id), config=setup.config)
        assert deleted.returncode == 0, deleted.stderr
        assert waiting() == ""
        assert run_esp("queue", "delete", str(queue_id), config=setup.config).returncode == 1
    finally:
        setup.rejecting = start_sink(setup.rejecting.directory, "127.0.0.4",
                                     port=setup.sink.port, options=["-f", "RCPT"])
