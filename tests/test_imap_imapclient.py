"""IMAPClient (PyPI), a widely used client library, against ESP: its parsers are strict about
the response grammar, so this checks ours as much as the commands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp
from tests.test_imap import deliver

PASSWORD = "kate's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("kate@example.test", PASSWORD)
    yield server
    server.process.stop()


def client(esp: EspServer) -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=esp.ports["imaps"], ssl=True, ssl_context=esp.client_tls(),
                   timeout=30)
    c.login("kate@example.test", PASSWORD)
    return c


def test_a_session_with_imapclient(esp: EspServer) -> None:
    deliver(esp, "hello kate", to="kate@example.test", body="first")
    deliver(esp, "second note", to="kate@example.test", body="second")
    c = client(esp)
    assert {b"IDLE", b"UIDPLUS", b"MOVE", b"CONDSTORE", b"SORT"} <= set(c.capabilities())
    folders = {name: flags for flags, _, name in c.list_folders()}
    assert b"\\Sent" in folders["Sent"] and b"\\Trash" in folders["Trash"]
    assert c.find_special_folder(b"\\Junk") == "Junk"

    info = c.select_folder("INBOX")
    assert info[b"EXISTS"] == 2 and info[b"UIDVALIDITY"] > 0 and b"HIGHESTMODSEQ" in info
    uids = c.search(["SUBJECT", "kate"])
    assert len(uids) == 1
    data = c.fetch(uids, ["ENVELOPE", "BODYSTRUCTURE", "FLAGS", "INTERNALDATE", "RFC822.SIZE",
                          "BODY.PEEK[TEXT]"])
    item = data[uids[0]]
    assert item[b"ENVELOPE"].subject == b"hello kate"
    assert item[b"ENVELOPE"].from_[0].mailbox == b"carol"
    assert item[b"BODYSTRUCTURE"][0].lower() == b"text"
    assert isinstance(item[b"INTERNALDATE"], datetime)
    assert item[b"BODY[TEXT]"] == b"first\r\n"
    assert item[b"FLAGS"] == ()

    c.add_flags(uids, [b"\\Seen", b"$Work"])
    assert set(c.get_flags(uids)[uids[0]]) == {b"\\Seen", b"$Work"}
    assert c.sort(["REVERSE", "ARRIVAL"]) == sorted(c.search(), reverse=True)

    result = c.append("Drafts", b"Subject: draft\r\n\r\nnot yet\r\n", flags=[b"\\Draft"])
    assert re.search(rb"APPENDUID \d+ \d+", result)
    c.copy(uids, "Archive")
    c.move(uids, "Trash")
    assert c.folder_status("Trash", ["MESSAGES"])[b"MESSAGES"] == 1
    assert c.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
    assert len(c.search()) == 1
    quota_roots, quotas = c.get_quota_root("INBOX")
    assert quota_roots.mailbox == "INBOX"
    c.logout()


def test_idle_with_imapclient(esp: EspServer) -> None:
    c = client(esp)
    c.select_folder("INBOX")
    c.idle()
    deliver(esp, "wake up", to="kate@example.test")
    responses = c.idle_check(timeout=30)
    c.idle_done()
    assert any(r[1] == b"EXISTS" for r in responses), responses
    c.logout()
