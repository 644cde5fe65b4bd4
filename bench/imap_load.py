"""IMAP load benchmark: a realistic command mix from N concurrent clients, a 100,000-message
SELECT, and many IDLE sessions woken by one delivery.

    python bench/imap_load.py [--clients 10] [--seconds 30] [--idle 1000] [--big 100000]

Prints operations/s and latency percentiles per command, server CPU and RSS, the SELECT time of
the big mailbox, and for the IDLE run the server's RSS and the delivery-to-EXISTS latency
(p50/p99) over every idling client.  ESP runs with its own PostgreSQL cluster (fsync on).  With
Dovecot installed (Debian package ``dovecot-imapd``) a private Dovecot instance serves copies of
the same Maildirs, the same mix and IDLE run go against it in the same run, and the ratios are
printed.  Only ratios from one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import random
import re
import resource
import select
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from smtp_accept import BIN, cpu_seconds, esp_config, rss_mib, tree_pids  # noqa: E402

from esp.addresses import parse_address  # noqa: E402
from esp.auth import PasswordHasher  # noqa: E402
from esp.config import Argon2Config  # noqa: E402
from esp.message import summarize  # noqa: E402
from esp.storage import directory  # noqa: E402
from esp.storage.cluster import EmbeddedCluster  # noqa: E402
from esp.storage.db import connect, run_sync  # noqa: E402
from esp.storage.mailboxes import import_messages_txn  # noqa: E402
from esp.storage.maildir import Maildir  # noqa: E402
from esp.storage.mailstore import NewMessage  # noqa: E402
from esp.storage.migrations import apply_migrations_txn, load_migrations  # noqa: E402

PASSWORD = "bench password"  # noqa: S105 (a throw-away test account)


# -- a small asyncio IMAP client -----------------------------------------------------------------


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tag = 0

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        client = cls(reader, writer)
        await client.line()  # greeting
        return client

    async def line(self) -> bytes:
        """One response line with its literals."""
        data = await self.reader.readline()
        if not data:
            raise ConnectionError("server closed the connection")
        while True:
            match = re.search(rb"\{(\d+)\}\r\n$", data)
            if match is None:
                return data
            data += await self.reader.readexactly(int(match.group(1)))
            data += await self.reader.readline()

    async def command(self, text: bytes) -> list[bytes]:
        self.tag += 1
        tag = b"b%d" % self.tag
        self.writer.write(tag + b" " + text + b"\r\n")
        lines = []
        while True:
            line = await self.line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"{text[:40]!r}: {line!r}")
                return lines
            lines.append(line)

    async def login(self, user: str) -> None:
        await self.command(f'LOGIN "{user}" "{PASSWORD}"'.encode())

    def close(self) -> None:
        self.writer.close()


# -- ESP under test -------------------------------------------------------------------------------


def start_esp(work: Path) -> tuple[subprocess.Popen[bytes], EmbeddedCluster, dict[str, int], Path]:
    work.mkdir(parents=True)
    os.chmod(work, 0o711)  # noqa: S103 (the cluster's account must reach it when run as root)
    cluster = EmbeddedCluster(work / "pg")
    cluster.start()
    conn = connect(cluster.dsn)
    run_sync(conn, apply_migrations_txn, load_migrations())
    conn.close()
    config = work / "esp.yaml"
    config.write_text(esp_config(
        work, cluster.dsn, workers=None,
        server="  imap:\n    listen: 'tcp:0:interface=127.0.0.1'\n"
               "    listen_tls: 'tcp:0:interface=127.0.0.1'\n"
               "    connections_per_ip: 0\n    connection_rate_per_ip: 0\n"
               "    sessions_per_user: 0\n",
        security="  auth:\n    allow_plaintext_on_loopback: true\n"
                 "    argon2: {time_cost: 1, memory_cost_kib: 8192, parallelism: 1}\n"))
    log = open(work / "esp.log", "w+b")
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "esp", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        text = (work / "esp.log").read_text()
        if "ready: host" in text:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ESP did not start:\n{text}")
        time.sleep(0.1)  # a benchmark harness, not a test
    ports = {m.group(1): int(m.group(2)) for m in
             re.finditer(r"(smtp-mx|imap)-0 listening on 127\.0\.0\.1:(\d+)", text)}
    return process, cluster, ports, work / "var" / "maildir"


def add_user(dsn: str, address: str, maildir: Path) -> int:
    conn = connect(dsn)
    try:
        try:
            run_sync(conn, directory.add_domain_txn, "example.test")
        except directory.AlreadyExists:
            pass
        hashed = PasswordHasher(Argon2Config(time_cost=1, memory_cost_kib=8192,
                                             parallelism=1)).hash(PASSWORD)
        return run_sync(conn, directory.add_user_txn, parse_address(address), hashed,
                        maildir).id
    finally:
        conn.close()


def fill(dsn: str, user_id: int, maildir: Path, relative: str, count: int,
         files: bool) -> None:
    """``count`` messages in INBOX (with real files when ``files``), through the storage."""
    box = Maildir(maildir / relative)
    box.create()
    start = datetime(2024, 1, 1, tzinfo=UTC)
    conn = connect(dsn)
    try:
        for first in range(0, count, 10_000):
            batch = []
            for n in range(first, min(first + 10_000, count)):
                body = (f"From: sender{n % 50}@remote.test\r\nTo: you@example.test\r\n"
                        f"Subject: message {n}\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
                        + "lorem ipsum dolor sit amet\r\n" * 60).encode()
                name = box.deliver(body, sync_directory=False).name if files else f"m{n}"
                batch.append(NewMessage(
                    mailbox_id=None, mailbox="INBOX", user_id=user_id, filename=name,
                    size=len(body), internal_date=start + timedelta(minutes=n),
                    envelope_from="x@remote.test", envelope_to=("you@example.test",),
                    summary=summarize(body), seen=n % 2 == 0,
                ))
            run_sync(conn, import_messages_txn, user_id, "INBOX", batch)
        if not files:
            # No files to index: mark the rows as the body indexer would (no text), so that it
            # does not spend the run finding 100,000 files missing.
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE messages SET body_tsv = ''::tsvector WHERE body_tsv IS NULL"
                            " AND mailbox_id IN (SELECT id FROM mailboxes WHERE user_id = %s)",
                            (user_id,))
    finally:
        conn.close()


# -- Dovecot, the anchor ------------------------------------------------------------------------


DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~
mail_fsync = optimized
default_internal_user = dovecot
default_login_user = dovenull
default_client_limit = {limit}
default_process_limit = 1000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%d/%n
}}
protocol imap {{
  mail_max_userip_connections = {limit}
}}
# Warm login processes (Dovecot's own high-performance setup); one imap process per session,
# as Dovecot runs them.
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = {limit}
}}
service imap {{
  process_limit = {sessions}
}}
service anvil {{
  client_limit = {anvil}
}}
service auth {{
  client_limit = {anvil}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# One imap process per session (~2-3 MB each): the Dovecot IDLE run is capped at this many.
DOVECOT_IDLE_MAX = 2000


def start_dovecot(
    work: Path, esp_maildir: Path, users: list[str], sessions: int
) -> tuple[subprocess.Popen[bytes], int, Path] | None:
    """A private Dovecot on copies of the users' Maildirs (None when not installed)."""
    binary = shutil.which("dovecot")
    if binary is None:
        return None
    root = work / "dovecot"
    (root / "mail").mkdir(parents=True)
    for user in users:
        local, domain = user.split("@")
        source = esp_maildir / domain / local
        target = root / "mail" / domain / local
        if source.exists():
            shutil.copytree(source, target)
        else:
            Maildir(target).create()
    (root / "users").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in users))
    account = pwd.getpwnam("nobody")
    for path in [root / "mail", *(root / "mail").rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(root, 0o755)  # noqa: S103 (Dovecot's unprivileged processes reach their sockets)
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(root=root, port=port, uid=account.pw_uid,
                                        gid=account.pw_gid, limit=20000, anvil=20000,
                                        sessions=sessions))
    process = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = root / "dovecot.log"
                raise SystemExit("Dovecot did not start:\n"
                                 + (log.read_text() if log.exists() else "")) from None
            time.sleep(0.1)  # a benchmark harness, not a test
    return process, port, root / "mail"


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


def raise_inotify_limit(needed: int) -> int | None:
    """Each Dovecot imap process watches its mailbox with an inotify instance of its own; past
    the per-user limit (128 by default) IDLE falls back to a 30 s poll.  Raise it for the run;
    return the old value (None when unchanged)."""
    try:
        old = int(INOTIFY_INSTANCES.read_text())
        if old >= needed:
            return None
        INOTIFY_INSTANCES.write_text(str(needed))
    except OSError as e:
        print(f"cannot raise fs.inotify.max_user_instances ({e}): Dovecot's IDLE will poll")
        return None
    return old


def maildir_delivery(maildir: Path, user: str) -> Callable[[], float]:
    """Deliver as an MTA's local delivery agent would (tmp/, then new/), for Dovecot."""
    local, domain = user.split("@")
    box = Maildir(maildir / domain / local)
    account = pwd.getpwnam("nobody")

    def deliver() -> float:
        started = time.monotonic()
        stored = box.deliver(b"Subject: wake up\r\n\r\nnow\r\n")
        os.chown(stored.path, account.pw_uid, account.pw_gid)
        return started

    return deliver


# -- the runs -------------------------------------------------------------------------------------


MIX = [("SELECT", 5), ("FETCH FLAGS", 15), ("FETCH HEADERS", 15), ("FETCH BODY", 20),
       ("STORE", 15), ("SEARCH", 10), ("APPEND", 5), ("NOOP", 15)]


async def mix_client(port: int, user: str, seconds: float,
                     latencies: dict[str, list[float]]) -> None:
    client = await Client.open(port)
    await client.login(user)
    lines = await client.command(b"SELECT INBOX")
    exists = next(int(m.group(1)) for line in lines
                  if (m := re.match(rb"\* (\d+) EXISTS", line)))
    names = [name for name, _ in MIX]
    weights = [w for _, w in MIX]
    deadline = time.monotonic() + seconds
    rng = random.Random(user)
    message = b"Subject: appended\r\n\r\n" + b"x" * 2000 + b"\r\n"
    while time.monotonic() < deadline:
        op = rng.choices(names, weights)[0]
        n = rng.randint(1, exists)
        started = time.monotonic()
        if op == "SELECT":
            await client.command(b"SELECT INBOX")
        elif op == "FETCH FLAGS":
            await client.command(b"FETCH 1:* (FLAGS)")
        elif op == "FETCH HEADERS":
            await client.command(b"FETCH %d:%d (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS "
                                 b"(FROM SUBJECT DATE)])" % (max(1, n - 19), n))
        elif op == "FETCH BODY":
            await client.command(b"FETCH %d BODY.PEEK[]" % n)
        elif op == "STORE":
            await client.command(b"STORE %d %sFLAGS (\\Seen)" % (n, rng.choice([b"+", b"-"])))
        elif op == "SEARCH":
            await client.command(b"SEARCH UNSEEN FROM sender1")
        elif op == "APPEND":
            await client.command(b"APPEND Drafts {%d+}\r\n" % len(message) + message)
        else:
            await client.command(b"NOOP")
        latencies[op].append(time.monotonic() - started)
    await client.command(b"LOGOUT")
    client.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


async def run_mix(port: int, users: list[str], seconds: float) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = defaultdict(list)
    await asyncio.gather(*(mix_client(port, u, seconds, latencies) for u in users))
    return latencies


async def run_select_big(port: int, user: str, times: int) -> list[float]:
    client = await Client.open(port)
    await client.login(user)
    results = []
    for _ in range(times):
        started = time.monotonic()
        await client.command(b"SELECT INBOX")
        results.append(time.monotonic() - started)
        await client.command(b"UNSELECT")
    client.close()
    return results


async def run_idle(port: int, deliver: Callable[[], float], user: str, count: int) -> list[float]:
    async def idling() -> Client:
        c = await Client.open(port)
        await c.login(user)
        await c.command(b"SELECT INBOX")
        c.writer.write(b"i IDLE\r\n")
        assert (await c.line()).startswith(b"+")
        return c

    clients: list[Client] = []
    # Logins 20 at a time: more would only queue behind the password hashing (and past its
    # backlog be told to come back later).
    for start in range(0, count, 20):
        clients.extend(await asyncio.gather(*(idling() for _ in range(min(20, count - start)))))

    # The wake-up is watched with one epoll loop over raw sockets in a thread: asyncio's
    # per-stream machinery costs tens of microseconds a line, which at 10,000 sessions would
    # measure the client, not the server.
    fds = []
    for c in clients:
        c.writer.transport.pause_reading()  # type: ignore[attr-defined]
        fds.append(c.writer.get_extra_info("socket").fileno())  # closed by c.close()
    await asyncio.sleep(0.5)  # every IDLE registered (a harness, not a test)
    times = await asyncio.to_thread(_watch, fds, deliver)
    for c in clients:
        c.close()
    return times


def _watch(fds: list[int], deliver: Callable[[], float]) -> list[float]:
    """Deliver one message and return, for each session, the seconds from the delivery's
    start to the EXISTS response."""
    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    sent: list[float] = []
    delivery = threading.Thread(target=lambda: sent.append(deliver()))
    delivery.start()
    woken: dict[int, float] = {}
    buffers: dict[int, bytes] = defaultdict(bytes)
    deadline = time.monotonic() + 120
    while len(woken) < len(fds) and time.monotonic() < deadline:
        for fd, _ in poller.poll(1.0):
            data = os.read(fd, 65536)
            now = time.monotonic()
            buffers[fd] += data
            if b"EXISTS\r\n" in buffers[fd] or not data:
                woken[fd] = now
                poller.unregister(fd)
    delivery.join()
    poller.close()
    if len(woken) < len(fds):
        raise RuntimeError(f"{len(fds) - len(woken)} IDLE sessions were never woken")
    return [t - sent[0] for t in woken.values()]


def send_floor(count: int) -> tuple[int, list[float]]:
    """What this machine allows any server: ``count`` loopback connections made here, one
    plain ``send`` each from a tight loop (no server logic at all), watched by the same
    epoll loop as the IDLE sessions.  Returns the connections used (two descriptors each,
    within the open-file limit) and their latencies."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(count, (hard - 256) // 2)
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    clients: list[socket.socket] = []
    servers: list[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(listener.getsockname()))
            servers.append(listener.accept()[0])

        def send_all() -> float:
            started = time.monotonic()
            for server in servers:
                server.send(b"* 2 EXISTS\r\n")
            return started

        return count, _watch([c.fileno() for c in clients], send_all)
    finally:
        for sock in (*clients, *servers, listener):
            sock.close()


def smtp_delivery(port: int, user: str) -> Callable[[], float]:
    return lambda: _deliver(port, user)


def _deliver(port: int, user: str) -> float:
    """Deliver one message; the time its DATA was sent (the push can beat the 250 to us)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail("bench@remote.test")
        smtp.rcpt(user)
        started = time.monotonic()
        smtp.data("Subject: wake up\r\n\r\nnow\r\n")
    return started


def print_mix(label: str, latencies: dict[str, list[float]], seconds: float, cpu: float,
              rss: float) -> dict[str, float]:
    """Print a mix run; its operations/s per command (and 'all')."""
    total = sum(len(v) for v in latencies.values())
    rates = {}
    print(label)
    for op, values in sorted(latencies.items()):
        rates[op] = len(values) / seconds
        print(f"  {op:<14} {rates[op]:8.0f} ops/s  "
              f"p50 {pct(values, 0.5):7.1f} ms  p99 {pct(values, 0.99):7.1f} ms")
    rates["all"] = total / seconds
    print(f"  all            {rates['all']:8.0f} ops/s  server CPU "
          f"{cpu / max(total, 1) * 1000:.2f} ms/op, RSS {rss:.0f} MiB")
    return rates


def dovecot_cpu(master: int) -> float:
    """CPU of the Dovecot master, its live children and (reaped) the ones gone."""
    children = [pid for pid in tree_pids(("dovecot",)) if pid != master]
    return cpu_seconds([master], (11, 12, 13, 14)) + cpu_seconds(children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--messages", type=int, default=500, help="per mix client")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="esp-imap-bench-"))
    os.chmod(work, 0o711)  # noqa: S103
    process, cluster, ports, maildir = start_esp(work / "esp")
    dovecot = None
    inotify_limit = None
    try:
        users = [f"user{i}@example.test" for i in range(args.clients)]
        for user in users:
            uid = add_user(cluster.dsn, user, maildir)
            fill(cluster.dsn, uid, maildir, f"example.test/{user.split('@')[0]}",
                 args.messages, files=True)
        big = "big@example.test"
        fill(cluster.dsn, add_user(cluster.dsn, big, maildir), maildir, "example.test/big",
             args.big, files=False)
        idler = "idle@example.test"
        add_user(cluster.dsn, idler, maildir)
        if not args.no_anchor:
            inotify_limit = raise_inotify_limit(min(args.idle, DOVECOT_IDLE_MAX) * 2 + 256)
            # Copies of the same Maildirs, made before ESP's run changes them.
            dovecot = start_dovecot(work, maildir, [*users, idler],
                                    min(args.idle, DOVECOT_IDLE_MAX) + args.clients + 50)
        pids = tree_pids((f"--config {work / 'esp' / 'esp.yaml'}", "postgres",
                          "esp.storage.diskwriter"))
        before = cpu_seconds(pids)
        latencies = asyncio.run(run_mix(ports["imap"], users, args.seconds))
        esp_rates = print_mix(
            f"{args.clients} clients, {args.seconds:.0f} s mix, {args.messages} messages "
            "each; ESP (1 process)", latencies, args.seconds, cpu_seconds(pids) - before,
            rss_mib(tree_pids(("esp.yaml",))),
        )

        selects = asyncio.run(run_select_big(ports["imap"], big, 5))
        print(f"SELECT of {args.big:,} messages: median {statistics.median(selects) * 1000:.0f}"
              f" ms (best {min(selects) * 1000:.0f} ms)")

        waits = asyncio.run(run_idle(ports["imap"], smtp_delivery(ports["smtp-mx"], idler),
                                     idler, args.idle))
        rss = rss_mib(tree_pids((f"--config {work / 'esp' / 'esp.yaml'}",)))
        print(f"{args.idle} IDLE sessions: ESP RSS {rss:.0f} MiB; delivery-to-EXISTS "
              f"p50 {pct(waits, 0.5):.0f} ms, p99 {pct(waits, 0.99):.0f} ms "
              "(from SMTP DATA)")
        used, floor = send_floor(args.idle)
        print(f"  this machine's floor, {used} loopback sockets, one send() each from a bare "
              f"loop: p50 {pct(floor, 0.5):.0f} ms, p99 {pct(floor, 0.99):.0f} ms")

        if dovecot is None:
            print("Dovecot not installed (or --no-anchor): no anchor this run")
            return
        dovecot_process, dovecot_port, dovecot_mail = dovecot
        before = dovecot_cpu(dovecot_process.pid)
        latencies = asyncio.run(run_mix(dovecot_port, users, args.seconds))
        anchor_rates = print_mix(
            "Dovecot, same mix, copies of the same Maildirs", latencies, args.seconds,
            dovecot_cpu(dovecot_process.pid) - before, rss_mib(tree_pids(("dovecot",))),
        )
        anchor_idle = min(args.idle, DOVECOT_IDLE_MAX)
        anchor_waits = asyncio.run(run_idle(
            dovecot_port, maildir_delivery(dovecot_mail, idler), idler, anchor_idle))
        print(f"{anchor_idle} IDLE sessions: Dovecot RSS "
              f"{rss_mib(tree_pids(('dovecot',))):.0f} MiB; delivery-to-EXISTS "
              f"p50 {pct(anchor_waits, 0.5):.0f} ms, p99 {pct(anchor_waits, 0.99):.0f} ms "
              "(from the Maildir write: no MTA in its path)")
        print("ESP / Dovecot, operations/s: " + ", ".join(
            f"{op} {esp_rates.get(op, 0) / rate:.2f}x"
            for op, rate in sorted(anchor_rates.items()) if rate))
        print(f"ESP / Dovecot, IDLE p99 latency: {pct(waits, 0.99) / pct(anchor_waits, 0.99):.2f}x"
              " (lower is better)")
    finally:
        process.terminate()
        process.wait(timeout=60)
        if dovecot is not None:
            dovecot[0].terminate()
            dovecot[0].wait(timeout=60)
        if inotify_limit is not None:
            INOTIFY_INSTANCES.write_text(str(inotify_limit))
        cluster.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
