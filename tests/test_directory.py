"""The directory in a real PostgreSQL: domains, users, aliases, catch-alls, recipient resolution."""

from __future__ import annotations

from pathlib import Path

import psycopg2.extensions
import pytest

from esp.addresses import Address, InvalidAddress, parse_address
from esp.storage import directory as d
from esp.storage.db import run_sync
from esp.storage.maildir import Maildir, retire

Conn = psycopg2.extensions.connection


def addr(text: str) -> Address:
    return parse_address(text)


@pytest.fixture
def hosted(connection: Conn, tmp_path: Path) -> Path:
    """example.test with alice and bob; other.test with carol."""
    root = tmp_path / "maildir"
    run_sync(connection, d.add_domain_txn, "example.test")
    run_sync(connection, d.add_domain_txn, "other.test")
    for user in ("alice@example.test", "bob@example.test", "carol@other.test"):
        run_sync(connection, d.add_user_txn, addr(user), "hash", root)
    return root


def resolve(connection: Conn, address: str) -> tuple[list[str], list[str]]:
    result = run_sync(connection, d.resolve_recipient_txn, addr(address))
    return sorted(u.address for u in result.users), sorted(result.external)


def test_domain_names_are_normalised_and_unique(connection: Conn) -> None:
    domain = run_sync(connection, d.add_domain_txn, "Example.TEST.")
    assert domain.name == "example.test"
    with pytest.raises(d.AlreadyExists, match="example.test already exists"):
        run_sync(connection, d.add_domain_txn, "EXAMPLE.test")
    idn = run_sync(connection, d.add_domain_txn, "bücher.example")
    assert idn.name == "xn--bcher-kva.example"
    assert [x.name for x in run_sync(connection, d.list_domains_txn)] == [
        "example.test", "xn--bcher-kva.example",
    ]


@pytest.mark.parametrize("bad", ["", "localhost", "a..b", "-x.test", "x_y.test", "1.2.3.4"])
def test_bad_domain_names_are_refused(connection: Conn, bad: str) -> None:
    with pytest.raises(InvalidAddress):
        run_sync(connection, d.add_domain_txn, bad)


def test_a_new_user_gets_inbox_special_use_mailboxes_and_maildir(
    connection: Conn, hosted: Path
) -> None:
    user = run_sync(connection, d.get_user_txn, addr("Alice@Example.test"))
    assert user.address == "alice@example.test"
    assert user.maildir == "example.test/alice"
    with connection.cursor() as cur:
        cur.execute(
            "SELECT name, special_use, folder, uidvalidity, uidnext FROM mailboxes "
            "WHERE user_id = %s ORDER BY name",
            (user.id,),
        )
        rows = cur.fetchall()
    assert {(r[0], r[1]) for r in rows} == {
        ("INBOX", None), ("Drafts", "\\Drafts"), ("Sent", "\\Sent"), ("Junk", "\\Junk"),
        ("Trash", "\\Trash"), ("Archive", "\\Archive"),
    }
    assert all(0 < r[3] < 2**32 and r[4] == 1 for r in rows)
    for _name, _use, folder, _v, _n in rows:
        for sub in ("cur", "new", "tmp"):
            assert (hosted / user.maildir / folder / sub).is_dir()


def test_user_in_unknown_domain_or_twice_is_refused(connection: Conn, hosted: Path) -> None:
    with pytest.raises(d.NotFound, match="nowhere.test is not hosted"):
        run_sync(connection, d.add_user_txn, addr("x@nowhere.test"), "h", hosted)
    with pytest.raises(d.AlreadyExists, match="alice@example.test already exists"):
        run_sync(connection, d.add_user_txn, addr("ALICE@example.test"), "h", hosted)


def test_a_domain_with_users_cannot_be_removed(connection: Conn, hosted: Path) -> None:
    with pytest.raises(d.DirectoryError, match="still has 2 user"):
        run_sync(connection, d.remove_domain_txn, "example.test")
    run_sync(connection, d.remove_user_txn, addr("carol@other.test"))
    run_sync(connection, d.remove_domain_txn, "other.test")
    assert [x.name for x in run_sync(connection, d.list_domains_txn)] == ["example.test"]


def test_a_user_resolves_to_itself(connection: Conn, hosted: Path) -> None:
    assert resolve(connection, "bob@example.test") == (["bob@example.test"], [])


def test_unknown_local_user_and_foreign_domain(connection: Conn, hosted: Path) -> None:
    with pytest.raises(d.UnknownRecipient):
        resolve(connection, "nobody@example.test")
    with pytest.raises(d.NotHosted):
        resolve(connection, "someone@elsewhere.test")


def test_plus_detail_reaches_the_user(connection: Conn, hosted: Path) -> None:
    assert resolve(connection, "alice+lists@example.test") == (["alice@example.test"], [])


def test_alias_to_local_users_and_external_addresses(connection: Conn, hosted: Path) -> None:
    for dest in ("alice@example.test", "carol@other.test", "friend@remote.test"):
        run_sync(connection, d.add_alias_txn, addr("team@example.test"), addr(dest))
    assert resolve(connection, "team@example.test") == (
        ["alice@example.test", "carol@other.test"],
        ["friend@remote.test"],
    )


def test_alias_chains_are_followed(connection: Conn, hosted: Path) -> None:
    run_sync(connection, d.add_alias_txn, addr("admins@example.test"), addr("bob@example.test"))
    run_sync(connection, d.add_alias_txn, addr("postmaster@example.test"), addr("admins@example.test"))
    assert resolve(connection, "postmaster@example.test") == (["bob@example.test"], [])


def test_alias_naming_the_user_keeps_a_copy(connection: Conn, hosted: Path) -> None:
    # Postfix virtual-alias idiom: bob -> bob, carol (deliver to bob and forward to carol).
    run_sync(connection, d.add_alias_txn, addr("bob@example.test"), addr("carol@other.test"))
    assert resolve(connection, "bob@example.test") == (["carol@other.test"], [])
    run_sync(connection, d.add_alias_txn, addr("bob@example.test"), addr("bob@example.test"))
    assert resolve(connection, "bob@example.test") == (
        ["bob@example.test", "carol@other.test"], []
    )


def test_catch_all_only_for_addresses_nobody_has(connection: Conn, hosted: Path) -> None:
    run_sync(connection, d.add_alias_txn, d.parse_alias_source("@example.test"), addr("bob@example.test"))
    assert resolve(connection, "anything@example.test") == (["bob@example.test"], [])
    assert resolve(connection, "alice@example.test") == (["alice@example.test"], [])
    with pytest.raises(d.UnknownRecipient):
        resolve(connection, "anything@other.test")


def test_alias_loops_are_refused_at_creation(connection: Conn, hosted: Path) -> None:
    run_sync(connection, d.add_alias_txn, addr("a@example.test"), addr("alice@example.test"))
    run_sync(connection, d.add_alias_txn, addr("b@example.test"), addr("a@example.test"))
    with pytest.raises(d.DirectoryError, match="would make a loop"):
        run_sync(connection, d.add_alias_txn, addr("a@example.test"), addr("b@example.test"))
    with pytest.raises(d.DirectoryError, match="cannot point at itself"):
        run_sync(connection, d.add_alias_txn, addr("a@example.test"), addr("a@example.test"))
    # A user's alias to itself is not a loop: it keeps a copy in the mailbox.
    run_sync(connection, d.add_alias_txn, addr("alice@example.test"), addr("alice@example.test"))
    assert resolve(connection, "b@example.test") == (["alice@example.test"], [])


def test_a_loop_made_behind_our_back_still_resolves(connection: Conn, hosted: Path) -> None:
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO aliases (domain_id, localpart, destination) "
            "SELECT id, l, dest FROM domains, (VALUES ('x', 'y@example.test'), "
            "('y', 'x@example.test'), ('y', 'alice@example.test')) AS v(l, dest) "
            "WHERE name = 'example.test'"
        )
    connection.commit()
    assert resolve(connection, "x@example.test") == (["alice@example.test"], [])


def test_alias_to_a_missing_local_address_is_refused(connection: Conn, hosted: Path) -> None:
    with pytest.raises(d.NotFound, match="neither a user nor an alias"):
        run_sync(connection, d.add_alias_txn, addr("x@example.test"), addr("ghost@other.test"))


def test_alias_removal(connection: Conn, hosted: Path) -> None:
    run_sync(connection, d.add_alias_txn, addr("x@example.test"), addr("alice@example.test"))
    run_sync(connection, d.add_alias_txn, addr("x@example.test"), addr("bob@example.test"))
    removed = run_sync(connection, d.remove_alias_txn, addr("x@example.test"), addr("bob@example.test"))
    assert [a.destination for a in removed] == ["bob@example.test"]
    assert resolve(connection, "x@example.test") == (["alice@example.test"], [])
    run_sync(connection, d.remove_alias_txn, addr("x@example.test"))
    with pytest.raises(d.UnknownRecipient):
        resolve(connection, "x@example.test")
    with pytest.raises(d.NotFound):
        run_sync(connection, d.remove_alias_txn, addr("x@example.test"))


def test_removing_a_user_removes_its_mailboxes_but_keeps_files(
    connection: Conn, hosted: Path
) -> None:
    user = run_sync(connection, d.remove_user_txn, addr("bob@example.test"))
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM mailboxes WHERE user_id = %s", (user.id,))
        assert cur.fetchone() == (0,)
    assert (hosted / user.maildir / "cur").is_dir()  # the caller retires it after the commit


def test_a_new_account_never_inherits_an_old_accounts_mail(
    connection: Conn, hosted: Path
) -> None:
    bob = run_sync(connection, d.get_user_txn, addr("bob@example.test"))
    Maildir(hosted / bob.maildir).deliver(b"Subject: for the old bob\r\n\r\nsecret\r\n")
    run_sync(connection, d.remove_user_txn, addr("bob@example.test"))
    # Left in place, the old mail blocks a new account of the same address...
    with pytest.raises(d.DirectoryError, match="already holds mail"):
        run_sync(connection, d.add_user_txn, addr("bob@example.test"), "h", hosted)
    # ...and once retired, the new account starts empty.
    kept = retire(hosted, bob.maildir)
    assert kept is not None and kept.is_relative_to(hosted / ".removed")
    assert len(list((kept / "new").iterdir())) == 1
    run_sync(connection, d.add_user_txn, addr("bob@example.test"), "h", hosted)
    assert not Maildir(hosted / bob.maildir).holds_mail()


def test_uidvalidity_grows_when_a_mailbox_is_recreated(connection: Conn, hosted: Path) -> None:
    def inbox_uidvalidity() -> int:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT m.uidvalidity FROM mailboxes m JOIN users u ON u.id = m.user_id "
                "WHERE u.localpart = 'carol' AND m.name = 'INBOX'"
            )
            row = cur.fetchone()
        connection.commit()
        assert row is not None
        return int(row[0])

    first = inbox_uidvalidity()
    carol = run_sync(connection, d.remove_user_txn, addr("carol@other.test"))
    retire(hosted, carol.maildir)
    run_sync(connection, d.add_user_txn, addr("carol@other.test"), "h", hosted)
    assert inbox_uidvalidity() > first  # RFC 3501 §2.3.1.1
