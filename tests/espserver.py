"""A real ESP server process for protocol tests: twistd with ephemeral ports and a test database,
plus quick ways to create domains and users in that database."""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from twisted.internet import reactor, threads

from esp.addresses import parse_address
from esp.auth import PasswordHasher
from esp.config import Argon2Config, load_config
from esp.events import Event
from esp.service import makeService
from esp.storage import directory
from esp.storage.db import run_sync
from tests.helpers import Server, assert_event_matches_schema, start_twistd

FAST_HASHING = Argon2Config(time_cost=1, memory_cost_kib=8192, parallelism=1)
HOSTNAME = "mx.example.test"


@dataclass
class EspServer:
    process: Server
    dsn: str
    data_dir: Path
    ports: dict[str, int]

    @property
    def maildir_root(self) -> Path:
        return self.data_dir / "maildir"

    @property
    def certificate(self) -> Path:
        return self.data_dir / "tls" / "selfsigned.crt"

    def client_tls(self) -> ssl.SSLContext:
        """Verifies ESP's self-signed certificate (the tests connect to 127.0.0.1 by address)."""
        context = ssl.create_default_context(cafile=str(self.certificate))
        context.check_hostname = False
        return context

    def add_domain(self, name: str) -> None:
        with connection(self.dsn) as conn:
            try:
                run_sync(conn, directory.add_domain_txn, name)
            except directory.AlreadyExists:
                pass

    def add_user(self, address: str, password: str, quota: int | None = None) -> None:
        self.add_domain(address.rpartition("@")[2])
        hashed = PasswordHasher(FAST_HASHING).hash(password)
        with connection(self.dsn) as conn:
            run_sync(
                conn, directory.add_user_txn, parse_address(address), hashed,
                self.maildir_root, quota_bytes=quota,
            )

    def add_alias(self, source: str, destination: str) -> None:
        with connection(self.dsn) as conn:
            run_sync(
                conn, directory.add_alias_txn, directory.parse_alias_source(source),
                parse_address(destination),
            )

    def messages(self, address: str, mailbox: str = "INBOX") -> list[tuple[int, int, str]]:
        """(uid, size, filename) of the stored messages, from the index."""
        local, _, domain = address.partition("@")
        with connection(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                """
                SELECT m.uid, m.size, m.filename FROM messages m
                JOIN mailboxes b ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id
                JOIN domains d ON d.id = u.domain_id
                WHERE d.name = %s AND u.localpart = %s AND b.name = %s ORDER BY m.uid
                """,
                (domain, local, mailbox),
            )
            return [(r[0], r[1], r[2]) for r in cur.fetchall()]

    def message_file(self, address: str, filename: str, folder: str = "") -> bytes:
        local, _, domain = address.partition("@")
        base = self.maildir_root / domain / local / folder
        for sub in ("new", "cur"):
            path = base / sub / filename
            if path.exists():
                return path.read_bytes()
        raise AssertionError(f"{filename} is not in {base}")


@contextmanager
def connection(dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(dsn)
    try:
        yield conn
    finally:
        conn.close()


NO_OUTBOUND = "    enabled: false\n"


def write_config(
    directory: Path, dsn: str, dns: str, extra: str = "", workers: int = 1, imap: str = "",
    outbound: str = NO_OUTBOUND, storage: str = "", top: str = "",
) -> Path:
    config = directory / "esp.yaml"
    config.write_text(
        f"server:\n  hostname: {HOSTNAME}\n  workers: {workers}\n"
        f"  dns: {{nameservers: ['{dns}'], timeout: 5}}\n"
        "  smtp:\n"
        "    mx: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submission: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submissions: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    max_message_size: 1048576\n"
        "    connection_rate_per_ip: 0\n"
        "  api:\n"
        "    listen: 'tcp:0:interface=127.0.0.1'\n"
        "  metrics:\n"
        "    listen: 'tcp:0:interface=127.0.0.1'\n"
        "  imap:\n"
        "    listen: 'tcp:0:interface=127.0.0.1'\n"
        "    listen_tls: 'tcp:0:interface=127.0.0.1'\n"
        + imap
        + "  outbound:\n" + outbound
        + f"storage:\n  data_dir: {directory / 'var'}\n  database:\n    dsn: '{dsn}'\n"
        + storage
        + "security:\n  auth:\n"
        "    argon2: {time_cost: 1, memory_cost_kib: 8192, parallelism: 1}\n"
        + extra
        + top
    )
    return config


_LISTENING = re.compile(
    r"(?:smtp-(\w+)|(imaps?|api|metrics))-0 listening on 127\.0\.0\.1:(\d+)")


def start_esp(
    directory: Path, dsn: str, dns: str, extra: str = "", workers: int = 1, imap: str = "",
    outbound: str = NO_OUTBOUND, storage: str = "", top: str = "",
) -> EspServer:
    """ESP with its DNS pointed at the test DNS server (``test_dns.nameserver``); ``extra``
    continues the ``security`` section, ``imap`` the ``server.imap`` one, ``outbound`` the
    ``server.outbound`` one and ``storage`` the ``storage`` one (4 or 2 spaces deep).
    Outbound delivery is off unless ``outbound`` says otherwise."""
    config = write_config(directory, dsn, dns, extra, workers, imap, outbound, storage, top)
    process = start_twistd("esp", "--config", str(config))
    process.wait_for("ready: host")
    ports = {m.group(1) or m.group(2): int(m.group(3)) for m in _LISTENING.finditer(process.log)}
    assert set(ports) == {"mx", "submission", "submissions", "imap", "imaps", "api",
                          "metrics"}, process.log
    return EspServer(process, dsn, directory / "var", ports)


async def events_of(
    scratch: Path, database_dsn: str, dns: str, users: list[str],
    client: Callable[[dict[str, int], ssl.SSLContext], None], top: str = "",
    settle: Callable[[], Awaitable[None]] | None = None,
) -> list[Event]:
    """Start ESP in this process with ``users`` (password "a long password"), run ``client``
    (ports by listener name, a context trusting ESP's certificate) in a thread, stop ESP;
    return every event published meanwhile.  ``top`` adds top-level configuration sections."""
    config = load_config(write_config(scratch, database_dsn, dns, top=top), environ={})
    with connection(database_dsn) as conn:
        run_sync(conn, directory.add_domain_txn, "example.test")
        for address in users:
            run_sync(conn, directory.add_user_txn, parse_address(address),
                     PasswordHasher(FAST_HASHING).hash("a long password"),
                     config.maildir_root)
    service = makeService(config, reactor)
    seen: list[Event] = []
    service.events.subscribe("#", seen.append)
    service.startService()
    try:
        await service.ready
        ports = {listener.name: listener.port.getHost().port for listener in service.listeners}
        context = ssl.create_default_context(cafile=str(config.data_dir / "tls" /
                                                        "selfsigned.crt"))
        context.check_hostname = False
        await threads.deferToThread(client, ports, context)
        if settle is not None:
            await settle()  # e.g. until() what the client set off has happened
    finally:
        await service.stopService()
    for event in seen:
        assert_event_matches_schema(event)  # what docs/schemas/events promises
    return seen
