"""Worker processes: several processes serve the same sockets; a dead worker is replaced; a
stop stops them all."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

from tests.dnszone import DNSServer
from tests.espserver import start_esp


def worker_pids(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and b"esp.worker" in cmdline:
            found.append(int(entry.name))
    return found


def test_workers_serve_and_are_replaced_when_they_die(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    server = start_esp(scratch, database_dsn, test_dns.nameserver, workers=3)
    try:
        # The parent's own "ready" line, then one from each worker.
        server.process.wait_for("] ESP 0.1.0 ready: ", count=3)
        parent = server.process.process.pid
        assert len(worker_pids(parent)) == 2
        server.add_user("erin@example.test", "erin's long password")
        for n in range(30):  # separate connections, accepted by whichever process wins
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
                client.sendmail("carol@remote.test", ["erin@example.test"],
                                f"Subject: {n}\r\n\r\nbody {n}\r\n")
        assert len(server.messages("erin@example.test")) == 30

        victim = worker_pids(parent)[0]
        os.kill(victim, signal.SIGKILL)
        server.process.wait_for("starting it again")
        server.process.wait_for("started worker", timeout=30, count=3)  # 2 + the replacement
        server.process.wait_for("] ESP 0.1.0 ready: ", timeout=30, count=3)  # it is serving
        replaced = worker_pids(parent)
        assert len(replaced) == 2 and victim not in replaced
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
            client.sendmail("carol@remote.test", ["erin@example.test"],
                            "Subject: after\r\n\r\nbody\r\n")
        assert len(server.messages("erin@example.test")) == 31
    finally:
        server.process.stop()
    assert worker_pids(parent) == []  # the stop took the workers with it
