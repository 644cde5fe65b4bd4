"""Worker processes: several processes serve the same sockets; a dead worker is replaced; a
stop stops them all; every process delivers through the parent's one Maildir writer."""

from __future__ import annotations

import os
import select
import signal
import smtplib
from pathlib import Path

from tests.dnszone import DNSServer
from tests.espserver import start_esp

# A process's "ready" line: the parent's own, then one from each worker.
READY = "] ESP 0.1.0 ready: "


def worker_pids(parent: int) -> list[int]:
    return child_pids(parent, b"esp.worker")


def writer_pids(parent: int) -> list[int]:
    """The Maildir writer helpers started by ``parent``."""
    return child_pids(parent, b"esp.storage.diskwriter")


def child_pids(parent: int, marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and marker in cmdline:
            found.append(int(entry.name))
    return found


def connection_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of the loopback connection from
    ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
                and state == "01" and fields[9] != "0"):  # established, with its socket
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def test_every_process_delivers_through_the_parents_one_maildir_writer(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    server = start_esp(scratch, database_dsn, test_dns.nameserver, workers=3)
    held: list[smtplib.SMTP] = []
    try:
        server.process.wait_for(READY, count=3)
        parent = server.process.process.pid
        processes = [parent, *worker_pids(parent)]
        assert len(processes) == 3
        server.add_user("fay@example.test", "fay's long password")
        # Connections held open until each process has one (each takes one per wake-up).
        by_process: dict[int, smtplib.SMTP] = {}
        for _ in range(200):
            client = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
            held.append(client)
            owner = connection_owner(server.ports["mx"], client.sock.getsockname()[1],
                                     processes)
            assert owner is not None
            by_process.setdefault(owner, client)
            if len(by_process) == len(processes):
                break
        assert sorted(by_process) == sorted(processes)
        for n, client in enumerate(by_process.values()):
            client.sendmail("carol@remote.test", ["fay@example.test"],
                            f"Subject: {n}\r\n\r\nbody\r\n")
        assert len(server.messages("fay@example.test")) == 3
        # One writer for the node, the parent's; the workers have none of their own.
        writers = [pid for process in processes
                   for pid in writer_pids(process)]
        assert writers == writer_pids(parent)
        assert len(writers) == 1

        # A writer that dies is replaced at once, and every process reaches the new one (a
        # delivery caught by the death is refused with 451 and goes through when retried).
        os.kill(writers[0], signal.SIGKILL)
        server.process.wait_for("starting the Maildir writer again")
        for n, client in enumerate(by_process.values()):
            message = f"Subject: again {n}\r\n\r\nbody\r\n"
            try:
                client.sendmail("carol@remote.test", ["fay@example.test"], message)
            except smtplib.SMTPDataError as e:
                assert e.smtp_code == 451
                client.sendmail("carol@remote.test", ["fay@example.test"], message)
        assert len(server.messages("fay@example.test")) == 6
        replaced = writer_pids(parent)
        assert len(replaced) == 1 and replaced != writers
    finally:
        for client in held:
            client.close()
        server.process.stop()


def test_workers_serve_and_are_replaced_when_they_die(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    server = start_esp(scratch, database_dsn, test_dns.nameserver, workers=3)
    try:
        server.process.wait_for(READY, count=3)
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
        server.process.wait_for(READY, timeout=30, count=3)  # it is serving
        replaced = worker_pids(parent)
        assert len(replaced) == 2 and victim not in replaced
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
            client.sendmail("carol@remote.test", ["erin@example.test"],
                            "Subject: after\r\n\r\nbody\r\n")
        assert len(server.messages("erin@example.test")) == 31
    finally:
        server.process.stop()
    assert worker_pids(parent) == []  # the stop took the workers with it


def test_workers_stop_when_their_parent_is_killed(
    scratch: Path, database_dsn: str, test_dns: DNSServer
) -> None:
    server = start_esp(scratch, database_dsn, test_dns.nameserver, workers=2)
    try:
        server.process.wait_for(READY, count=2)
        parent = server.process.process.pid
        [worker] = worker_pids(parent)
        [writer] = writer_pids(parent)
        ended = [os.pidfd_open(pid) for pid in (worker, writer)]
        os.kill(parent, signal.SIGKILL)
        # Each becomes readable when its process has exited (no polling, no sleeping).
        for fd in ended:
            readable, _, _ = select.select([fd], [], [], 60)
            assert readable, "a child of the killed parent is still running"
            os.close(fd)
    finally:
        server.process.stop()
