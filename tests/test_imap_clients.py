"""Real IMAP clients against ESP: mbsync (Debian package isync) syncing both ways."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.test_imap import deliver

PASSWORD = "erin's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("erin@example.test", PASSWORD)
    yield server
    server.process.stop()


def mbsync(config: Path) -> None:
    program = shutil.which("mbsync")
    assert program, "mbsync is not installed (Debian package isync; .ci/run installs it)"
    result = subprocess.run([program, "-V", "-c", str(config), "-a"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def local_files(local: Path) -> dict[str, bytes]:
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for sub in ("new", "cur") if (local / "INBOX" / sub).exists()
        for p in (local / "INBOX" / sub).iterdir()
    }


def _normal(message: bytes) -> bytes:
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    return b"\n".join(line for line in lines if not line.startswith(b"X-TUID: "))


def server_state(esp: EspServer) -> list[tuple[int, bool, bool, str]]:
    with psycopg2.connect(esp.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT m.uid, m.seen, m.flagged, coalesce(m.subject, '') FROM messages m
            JOIN mailboxes b ON b.id = m.mailbox_id JOIN users u ON u.id = b.user_id
            WHERE u.localpart = 'erin' AND b.name = 'INBOX' ORDER BY m.uid
            """
        )
        return list(cur.fetchall())


def test_mbsync_pulls_pushes_and_then_has_nothing_to_do(esp: EspServer, scratch: Path) -> None:
    deliver(esp, "first", to="erin@example.test", body="first body")
    deliver(esp, "second", to="erin@example.test")
    local = scratch / "local"
    local.mkdir()
    config = scratch / "mbsyncrc"
    config.write_text(
        f"IMAPAccount esp\nHost 127.0.0.1\nPort {esp.ports['imaps']}\n"
        f"User erin@example.test\nPass \"{PASSWORD}\"\nSSLType IMAPS\n"
        f"CertificateFile {esp.certificate}\n\n"
        "IMAPStore remote\nAccount esp\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n"
        "Expunge Both\nSyncState *\n"
    )

    # Pull: every message arrives byte for byte, every special-use folder is created.
    mbsync(config)
    pulled = local_files(local)
    assert len(pulled) == 2
    stored = {esp.message_file("erin@example.test", name) for _, _, name in
              esp.messages("erin@example.test")}
    # mbsync stores with LF line ends and adds its X-TUID header: compare the rest.
    assert {_normal(data) for data in pulled.values()} == {_normal(data) for data in stored}
    assert {p.name for p in local.iterdir()} >= {"INBOX", "Sent", "Drafts", "Trash", "Junk",
                                                  "Archive"}

    # Push: a new local message, and a flag change on a pulled one.
    (local / "INBOX" / "new" / "1700000000.local.near:2,S").write_bytes(
        b"From: erin@example.test\r\nSubject: pushed\r\n\r\nwritten offline\r\n"
    )
    first = None
    for path in sorted((local / "INBOX").glob("*/*")):
        if b"Subject: first" in path.read_bytes():
            first = path
    assert first is not None
    base = first.name.split(":2,")[0]
    first.rename(first.parent.parent / "cur" / f"{base}:2,FS")
    mbsync(config)
    state = server_state(esp)
    assert [subject for *_, subject in state] == ["first", "second", "pushed"]
    assert state[0][1:3] == (True, True)  # \Seen and \Flagged reached the server
    assert state[2][1] is True  # the pushed message was seen locally

    # Nothing left to do: a third run changes nothing on either side.
    before = (local_files(local), server_state(esp))
    mbsync(config)
    assert (local_files(local), server_state(esp)) == before
