"""The IMAP server over real sockets with Python's imaplib: TLS and login rules, LIST, SELECT,
FETCH, STORE, EXPUNGE, updates seen by a second session, and hostile input."""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.dnszone import DNSServer
from tests.espserver import EspServer, start_esp

PASSWORD = "alice's long password"


@pytest.fixture(scope="module")
def esp(module_scratch: Path, module_database_dsn: str, test_dns: DNSServer) -> Iterator[EspServer]:
    server = start_esp(module_scratch, module_database_dsn, test_dns.nameserver)
    server.add_user("alice@example.test", PASSWORD)
    server.add_user("bob@example.test", "bob's long password")
    yield server
    server.process.stop()


def deliver(esp: EspServer, subject: str, to: str = "alice@example.test", body: str = "hi",
            cte: str | None = None) -> None:
    message = EmailMessage()
    message["From"] = "carol@remote.test"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9]+', '.', subject).strip('.')}@remote.test>"
    message.set_content(body, cte=cte)
    with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=30) as client:
        client.send_message(message, "carol@remote.test", [to])


def login(esp: EspServer, user: str = "alice@example.test",
          password: str = PASSWORD) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=esp.client_tls(),
                               timeout=30)
    client.login(user, password)
    return client


def test_login_needs_tls_and_the_right_password(esp: EspServer) -> None:
    plain = imaplib.IMAP4("127.0.0.1", esp.ports["imap"], timeout=30)
    assert "LOGINDISABLED" in plain.capabilities and "STARTTLS" in plain.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        plain.login("alice@example.test", PASSWORD)
    plain.starttls(esp.client_tls())
    assert "AUTH=PLAIN" in plain.capabilities and "STARTTLS" not in plain.capabilities
    assert plain.login("alice@example.test", PASSWORD)[0] == "OK"
    plain.logout()

    tls = imaplib.IMAP4_SSL("127.0.0.1", esp.ports["imaps"], ssl_context=esp.client_tls(),
                            timeout=30)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        tls.login("alice@example.test", "wrong")
    assert tls.authenticate("PLAIN", lambda _: b"\0bob@example.test\0bob's long password")[0] \
        == "OK"
    tls.logout()


def test_list_shows_the_special_use_mailboxes(esp: EspServer) -> None:
    client = login(esp)
    status, lines = client.list()
    assert status == "OK"
    listed = {line.decode().rsplit(" ", 1)[1].strip('"'): line.decode() for line in lines}
    assert set(listed) == {"INBOX", "Drafts", "Sent", "Junk", "Trash", "Archive"}
    assert "\\Sent" in listed["Sent"] and "\\HasNoChildren" in listed["Sent"]
    status, lines = client.list('""', "S%")
    assert [line.decode() for line in lines] == ['(\\HasNoChildren \\Sent) "/" "Sent"']
    status, lines = client.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")
    assert status == "OK" and re.match(rb'"INBOX" \(MESSAGES \d+ UIDNEXT \d+ UNSEEN \d+\)',
                                       lines[0])
    client.logout()


def test_select_fetch_store_expunge(esp: EspServer) -> None:
    deliver(esp, "first message", body="the first body")
    deliver(esp, "second message")
    stored = esp.messages("alice@example.test")
    client = login(esp)
    status, data = client.select("INBOX")
    assert status == "OK" and int(data[0]) == len(stored)
    assert client.untagged_responses["UIDVALIDITY"][0].isdigit()
    count = len(stored)

    # BODY.PEEK[] is the file as stored, and leaves the message unseen.
    status, data = client.fetch(str(count - 1), "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
    header, body = data[0]
    uid, size, filename = stored[-2]
    assert body == esp.message_file("alice@example.test", filename)
    assert f"UID {uid}".encode() in header and f"RFC822.SIZE {size}".encode() in header
    assert b"FLAGS ()" in header

    # Sections, partial fetch, and BODY[] sets \Seen.
    status, data = client.uid("FETCH", str(uid), "(BODY[HEADER.FIELDS (SUBJECT)] BODY[]<0.5>)")
    assert data[0][1] == b"Subject: first message\r\n\r\n"
    assert data[1][1] == body[:5]
    status, data = client.uid("FETCH", str(uid), "(FLAGS)")
    assert b"\\Seen" in data[0]

    # ENVELOPE and BODYSTRUCTURE for a simple text message.
    status, data = client.uid("FETCH", str(uid), "(ENVELOPE BODYSTRUCTURE)")
    response = data[0] if isinstance(data[0], bytes) else b"".join(data[0])
    assert b'"first message"' in response and b'"<first.message@remote.test>"' in response
    assert b'("text" "plain"' in response.lower() or b'("TEXT" "PLAIN"' in response

    # STORE answers with the new flags; EXPUNGE removes the row and the file.
    status, data = client.store(str(count), "+FLAGS", "(\\Deleted $Important)")
    assert b"\\Deleted" in data[0] and b"$Important" in data[0]
    status, data = client.expunge()
    assert status == "OK" and data == [str(count).encode()]
    assert len(esp.messages("alice@example.test")) == count - 1
    with pytest.raises(AssertionError):
        esp.message_file("alice@example.test", stored[-1][2])
    client.logout()


def test_a_second_session_hears_of_changes(esp: EspServer) -> None:
    deliver(esp, "for two sessions")
    one, two = login(esp), login(esp)
    one.select("INBOX")
    status, data = two.select("INBOX")
    count = int(data[0])
    two.untagged_responses.clear()  # what SELECT said
    deliver(esp, "arrives meanwhile")
    one.store(str(count), "+FLAGS", "(\\Flagged)")
    one.store("1", "+FLAGS", "(\\Deleted)")
    one.expunge()
    status, _ = two.noop()
    assert status == "OK"
    assert two.untagged_responses.get("EXPUNGE") == [b"1"]
    assert two.untagged_responses.get("EXISTS") == [str(count).encode()]
    fetches = [x for x in two.untagged_responses.get("FETCH", []) if b"\\Flagged" in x]
    assert fetches and fetches[0].startswith(str(count - 1).encode() + b" ")
    one.logout()
    two.logout()


def raw_session(esp: EspServer) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", esp.ports["imaps"]), timeout=30)
    tls = esp.client_tls().wrap_socket(sock)
    tls.recv(4096)
    return tls


def read_until(sock: socket.socket | ssl.SSLSocket, pattern: bytes) -> bytes:
    received = b""
    while not re.search(pattern, received):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; got {received!r}"
        received += chunk
    return received


def exchange(sock: ssl.SSLSocket, data: bytes, tag: bytes | None) -> bytes:
    """Send ``data``; read to the tagged answer (or, without a tag, to the end of a line)."""
    sock.sendall(data)
    if tag is None:
        return read_until(sock, rb"\r\n\Z")
    return read_until(sock, rb"(^|\r\n)" + tag + rb" (OK|NO|BAD)[^\r]*\r\n$")


def test_hostile_input_gets_bad_and_the_session_survives(esp: EspServer) -> None:
    sock = raw_session(esp)
    assert b"a1 BAD" in exchange(sock, b"a1 SELECT INBOX\r\n", b"a1")  # not logged in
    assert b"a2 BAD" in exchange(sock, b"a2 FROBNICATE\r\n", b"a2")
    assert b"a3 BAD" in exchange(sock, b'a3 LOGIN "unterminated\r\n', b"a3")
    # A literal larger than any command may carry is refused before it is sent.
    assert b"a4 BAD" in exchange(sock, b"a4 LOGIN {99999999}\r\n", b"a4")
    reply = exchange(sock, b'a5 LOGIN "alice@example.test" {%d}\r\n' % len(PASSWORD), None)
    assert reply.startswith(b"+")
    assert b"a5 OK" in exchange(sock, PASSWORD.encode() + b"\r\n", b"a5")
    assert b"a6 OK" in exchange(sock, b"a6 SELECT INBOX\r\n", b"a6")
    assert b"a7 BAD" in exchange(sock, b"a7 FETCH 0:x (FLAGS)\r\n", b"a7")
    assert b"a8 BAD" in exchange(sock, b"a8 FETCH 1 (FLAGS\r\n", b"a8")
    assert b"a9 BAD" in exchange(sock, b"a9 FETCH 1 (BODY[NOPE])\r\n", b"a9")
    assert b"b1 BAD" in exchange(sock, b"b1 FETCH 999999 (FLAGS)\r\n", b"b1")
    assert b"b2 NO" in exchange(sock, b'b2 SELECT "../../etc"\r\n', b"b2")
    assert b"b3 BAD" in exchange(sock, b"b3 SELECT &Jjo\r\n", b"b3")  # broken modified UTF-7
    # IDLE ends with DONE and nothing else.
    assert exchange(sock, b"b4 IDLE\r\n", None).startswith(b"+")
    assert b"b4 BAD" in exchange(sock, b"STOP\r\n", b"b4")
    assert exchange(sock, b"b5 IDLE\r\n", None).startswith(b"+")
    assert b"b5 OK" in exchange(sock, b"DONE\r\n", b"b5")
    assert b"b6 OK" in exchange(sock, b"b6 NOOP\r\n", b"b6")
    sock.close()


def test_create_rename_subscribe_delete(esp: EspServer) -> None:
    client = login(esp, "bob@example.test", "bob's long password")
    assert client.create("Projects/2026")[0] == "OK"  # the parent is created too
    names = [line.decode() for line in client.list('""', "Projects*")[1]]
    assert names == ['(\\HasChildren) "/" "Projects"', '(\\HasNoChildren) "/" "Projects/2026"']
    status, data = client.create("Projects")
    assert status == "NO" and b"ALREADYEXISTS" in data[0]
    status, data = client.create("Entw&APw-rfe")  # "Entwürfe" in modified UTF-7
    assert status == "OK"
    assert client.rename("Projects", "Archive/Projects")[0] == "OK"
    names = [line.decode().rsplit(" ", 1)[1] for line in client.list('""', "*")[1]]
    assert '"Archive/Projects/2026"' in names and '"Projects"' not in names
    assert '"Entw&APw-rfe"' in names
    assert client.unsubscribe("Archive/Projects/2026")[0] == "OK"
    subscribed = [line.decode().rsplit(" ", 1)[1] for line in client.lsub('""', "*")[1]]
    assert '"Archive/Projects/2026"' not in subscribed and '"Archive/Projects"' in subscribed
    assert client.delete("Archive/Projects")[0] == "NO"  # has a child
    assert client.delete("Archive/Projects/2026")[0] == "OK"
    assert client.delete("INBOX")[0] == "NO"
    client.logout()


def test_hostile_mailbox_names_are_refused(esp: EspServer) -> None:
    sock = raw_session(esp)
    exchange(sock, b'a1 LOGIN "bob@example.test" "bob\'s long password"\r\n', b"a1")
    for n, name in enumerate((b'"../x"', b'"a//b"', b'"/abs"', b'"a/./b"', b'"x*"',
                              b'"' + b"n" * 600 + b'"')):
        tag = b"c%d" % n
        reply = exchange(sock, tag + b" CREATE " + name + b"\r\n", tag)
        assert tag + b" NO" in reply, reply
    assert b"c9 OK" in exchange(sock, b"c9 NOOP\r\n", b"c9")
    sock.close()


def test_append_with_flags_and_date(esp: EspServer) -> None:
    client = login(esp)
    message = b"From: alice@example.test\r\nSubject: appended\r\n\r\nsaved draft\r\n"
    status, data = client.append("Drafts", "(\\Draft \\Seen $Later)",
                                 '"17-Jul-1996 02:44:25 -0700"', message)
    assert status == "OK"
    match = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
    assert match is not None
    client.select("Drafts")
    status, data = client.uid("FETCH", match.group(2).decode(),
                              "(FLAGS INTERNALDATE BODY.PEEK[])")
    header, body = data[0]
    assert body == message
    assert b"\\Draft" in header and b"\\Seen" in header and b"$Later" in header
    assert b'INTERNALDATE "17-Jul-1996 09:44:25 +0000"' in header  # the same instant
    status, data = client.append("Nowhere", None, None, message)
    assert status == "NO" and b"TRYCREATE" in data[0]
    client.logout()


def test_search(esp: EspServer) -> None:
    esp.add_user("carol@example.test", "carol's long password")
    deliver(esp, "quarterly report", to="carol@example.test", body="numbers inside zebra")
    deliver(esp, "lunch", to="carol@example.test", body="pizza")
    deliver(esp, "report draft", to="carol@example.test", body="more numbers")
    client = login(esp, "carol@example.test", "carol's long password")
    client.select("INBOX")
    client.store("2", "+FLAGS", "(\\Seen)")

    def search(*keys: str, uid: bool = False) -> list[int]:
        status, data = client.uid("SEARCH", *keys) if uid else client.search(None, *keys)
        assert status == "OK", data
        return [int(n) for n in data[0].split()]

    assert search("ALL") == [1, 2, 3]
    assert search("SUBJECT", "REPORT") == [1, 3]  # case-insensitive substring
    assert search("FROM", '"carol@remote"') == [1, 2, 3]
    assert search("UNSEEN") == [1, 3] and search("SEEN") == [2]
    assert search("BODY", "zebra") == [1] and search("TEXT", "lunch") == [2]
    assert search("OR", "SUBJECT", "lunch", "BODY", "zebra") == [1, 2]
    assert search("NOT", "SUBJECT", "report") == [2]
    assert search("SINCE", "1-Jan-2020", "SMALLER", "100000") == [1, 2, 3]
    assert search("BEFORE", "1-Jan-2020") == []
    assert search("HEADER", "Message-ID", "lunch@remote") == [2]
    assert search("2:3", "UNSEEN") == [3]
    uids = [uid for uid, _, _ in esp.messages("carol@example.test")]
    assert search("UID", f"{uids[1]}:*", uid=True) == uids[1:]
    assert search("CHARSET", "UTF-8", "SUBJECT", "lunch") == [2]
    status, data = client.search("KOI8-R", "SUBJECT", "x")
    assert status == "NO" and b"BADCHARSET" in data[0]
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        client.search(None, "SINCE", "yesterday")
    # Bodies are searched as decoded text (the full-text index), not as the bytes of the file.
    deliver(esp, "tram", to="carol@example.test", body="Take the Strassenbahn home", cte="base64")
    assert search("BODY", "strassenbahn") == [4] and search("BODY", '"the strassen"') == [4]
    assert search("TEXT", "tram") == [4] and search("NOT", "BODY", "strassenbahn") == [1, 2, 3]
    assert search("BODY", "numbers") == [1, 3] and search("BODY", '"inside numbers"') == []
    client.logout()


def test_idle_is_woken_by_a_delivery_and_by_another_session(esp: EspServer) -> None:
    esp.add_user("dave@example.test", "dave's long password")
    deliver(esp, "before idle", to="dave@example.test")
    sock = raw_session(esp)
    exchange(sock, b'a1 LOGIN "dave@example.test" "dave\'s long password"\r\n', b"a1")
    assert b"* 1 EXISTS" in exchange(sock, b"a2 SELECT INBOX\r\n", b"a2")
    assert exchange(sock, b"a3 IDLE\r\n", None).startswith(b"+")
    # No command is sent: the news is pushed (the socket has a 30 s timeout, no sleeping).
    deliver(esp, "during idle", to="dave@example.test")
    assert b"* 2 EXISTS" in read_until(sock, rb"\* 2 EXISTS\r\n")
    other = login(esp, "dave@example.test", "dave's long password")
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Flagged)")
    assert b"\\Flagged" in read_until(sock, rb"\* 1 FETCH \(FLAGS \([^)]*\\Flagged")
    other.store("1", "+FLAGS", "(\\Deleted)")
    other.expunge()
    assert b"* 1 EXPUNGE" in read_until(sock, rb"\* 1 EXPUNGE\r\n")
    other.logout()
    assert b"a3 OK" in exchange(sock, b"DONE\r\n", b"a3")
    sock.close()


def test_copy_and_move_with_uidplus(esp: EspServer) -> None:
    esp.add_user("frank@example.test", "frank's long password")
    for subject in ("keep", "copy me", "move me"):
        deliver(esp, subject, to="frank@example.test")
    client = login(esp, "frank@example.test", "frank's long password")
    assert b"UIDPLUS" in b" ".join(c.encode() for c in client.capabilities)
    client.select("INBOX")
    status, data = client.copy("2", "Archive")
    assert status == "OK"
    match = re.search(rb"COPYUID (\d+) (\d+) (\d+)", data[-1])
    assert match is not None
    inbox = esp.messages("frank@example.test")
    archive = esp.messages("frank@example.test", "Archive")
    assert [uid for uid, _, _ in archive] == [int(match.group(3))]
    assert esp.message_file("frank@example.test", archive[0][2], ".Archive") == \
        esp.message_file("frank@example.test", inbox[1][2])

    typ, data = client._simple_command("MOVE", "3", "Trash")  # imaplib has no move()
    assert typ == "OK"
    assert client.untagged_responses.get("EXPUNGE") == [b"3"]
    assert len(esp.messages("frank@example.test")) == 2
    assert len(esp.messages("frank@example.test", "Trash")) == 1
    status, data = client.copy("1", "Nowhere")
    assert status == "NO" and b"TRYCREATE" in data[0]
    client.logout()


def test_quota_is_reported_and_enforced_on_append(esp: EspServer) -> None:
    esp.add_user("gina@example.test", "gina's long password", quota=4096)
    client = login(esp, "gina@example.test", "gina's long password")
    status, data = client.getquotaroot("INBOX")
    assert status == "OK"
    assert data[0] == [b'"INBOX" ""'] and data[1] == [b'"" (STORAGE 0 4)']
    message = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"
    status, data = client.append("INBOX", None, None, message)
    assert status == "NO" and b"OVERQUOTA" in data[0]
    assert client.append("INBOX", None, None, b"Subject: small\r\n\r\nok\r\n")[0] == "OK"
    status, data = client.getquota('""')
    assert data == [b'"" (STORAGE 1 4)']
    client.logout()


def test_condstore_lets_a_second_device_catch_up(esp: EspServer) -> None:
    esp.add_user("hank@example.test", "hank's long password")
    for subject in ("a", "b", "c"):
        deliver(esp, subject, to="hank@example.test")
    phone = login(esp, "hank@example.test", "hank's long password")
    assert "CONDSTORE" in phone.capabilities
    typ, data = phone._simple_command("ENABLE", "CONDSTORE")
    assert typ == "OK" and phone.untagged_responses.pop("ENABLED") == [b"CONDSTORE"]
    phone.select("INBOX")
    seen_at = int(phone.untagged_responses["HIGHESTMODSEQ"][0])

    laptop = login(esp, "hank@example.test", "hank's long password")
    laptop.select("INBOX")
    laptop.store("2", "+FLAGS", "(\\Seen)")
    laptop.logout()

    # Only what changed since the phone last looked, with its MODSEQ.
    typ, data = phone._simple_command("FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {seen_at})")
    assert typ == "OK"
    changed = phone.untagged_responses.pop("FETCH")
    # (The news may also come unsolicited, before the FETCH's own answer: both name only 2.)
    assert changed and all(x.startswith(b"2 (FLAGS (\\Seen) ") and b"MODSEQ (" in x
                           for x in changed)
    status, data = phone.search(None, "MODSEQ", str(seen_at + 1))
    assert data[0].startswith(b"2 (MODSEQ ")

    # A change conditional on an old MODSEQ is refused for the message changed meanwhile.
    typ, data = phone._simple_command("STORE", "1:3", f"(UNCHANGEDSINCE {seen_at})", "+FLAGS",
                                      "(\\Flagged)")
    assert typ == "OK" and b"[MODIFIED 2]" in data[0]
    flags = {int(x.split()[0]): x for x in phone.untagged_responses.pop("FETCH")}
    assert set(flags) == {1, 3} and all(b"\\Flagged" in x for x in flags.values())
    phone.logout()


def test_sort(esp: EspServer) -> None:
    esp.add_user("ivy@example.test", "ivy's long password")
    deliver(esp, "banana", to="ivy@example.test", body="x" * 10)
    deliver(esp, "Re: apple", to="ivy@example.test", body="x" * 3000)
    deliver(esp, "[list] cherry", to="ivy@example.test", body="x" * 500)
    client = login(esp, "ivy@example.test", "ivy's long password")
    client.select("INBOX")
    assert client.sort("(SUBJECT)", "UTF-8", "ALL") == ("OK", [b"2 1 3"])
    assert client.sort("(REVERSE SIZE)", "UTF-8", "ALL") == ("OK", [b"2 3 1"])
    assert client.sort("(ARRIVAL)", "UTF-8", "NOT", "SUBJECT", "banana") == ("OK", [b"2 3"])
    uids = [uid for uid, _, _ in esp.messages("ivy@example.test")]
    status, data = client.uid("SORT", "(REVERSE DATE)", "UTF-8", "ALL")
    assert data == [" ".join(str(u) for u in reversed(uids)).encode()]
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        client.sort("(REVERSE)", "UTF-8", "ALL")
    client.logout()


MULTIPART = (
    b"From: a@remote.test\r\nSubject: with attachment\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="B0UNDARY"\r\n\r\n'
    b"preamble\r\n--B0UNDARY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"hello\r\nworld\r\n--B0UNDARY\r\n"
    b'Content-Type: application/pdf; name="r\xc3\xa9sum\xc3\xa9.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="cv.pdf"\r\n\r\n'
    b"JVBERi0xLjQK\r\n--B0UNDARY--\r\n"
)


def test_multipart_structure_and_parts(esp: EspServer) -> None:
    esp.add_user("lena@example.test", "lena's long password")
    client = login(esp, "lena@example.test", "lena's long password")
    assert client.append("INBOX", None, None, MULTIPART)[0] == "OK"
    client.select("INBOX")
    status, data = client.fetch("1", "(BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2.MIME] "
                                     "BODY.PEEK[2])")
    text = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)
    assert (b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 12 2 NIL NIL NIL NIL)'
            b'("application" "pdf" ("name" {12}r\xc3\xa9sum\xc3\xa9.pdf) NIL NIL "base64" 12 NIL '
            b'("attachment" ("filename" "cv.pdf")) NIL NIL) "mixed" ("boundary" "B0UNDARY") '
            b"NIL NIL NIL)") in text
    parts = [x[1] for x in data if isinstance(x, tuple)][1:]  # after the 8-bit file name
    assert parts == [
        b"hello\r\nworld",
        b'Content-Type: application/pdf; name="r\xc3\xa9sum\xc3\xa9.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="cv.pdf"\r\n\r\n',
        b"JVBERi0xLjQK",
    ]
    client.logout()


def test_renaming_inbox_moves_its_messages(esp: EspServer) -> None:
    esp.add_user("mia@example.test", "mia's long password")
    deliver(esp, "old one", to="mia@example.test")
    deliver(esp, "old two", to="mia@example.test")
    before = {name: esp.message_file("mia@example.test", name)
              for _, _, name in esp.messages("mia@example.test")}
    client = login(esp, "mia@example.test", "mia's long password")
    client.select("INBOX")
    assert client.rename("INBOX", "Old/2026")[0] == "OK"
    assert client.untagged_responses.get("EXPUNGE") == [b"1", b"1"]
    assert esp.messages("mia@example.test") == []
    moved = esp.messages("mia@example.test", "Old/2026")
    assert [uid for uid, _, _ in moved] == [1, 2]
    assert {name: esp.message_file("mia@example.test", name, ".Old.2026")
            for _, _, name in moved} == before
    status, data = client.select("INBOX")
    assert int(data[0]) == 0
    deliver(esp, "new mail", to="mia@example.test")  # INBOX still receives
    assert len(esp.messages("mia@example.test")) == 1
    client.logout()
