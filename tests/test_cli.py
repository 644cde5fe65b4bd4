"""The `esp` admin CLI as a subprocess: changes land in the database, errors exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pexpect
import psycopg2
import pytest

from tests.helpers import program, run_esp

PASSWORD = "correct horse battery\n"


@pytest.fixture
def config(scratch: Path, database_dsn: str) -> Path:
    path = scratch / "esp.yaml"
    path.write_text(
        f"storage:\n  data_dir: {scratch / 'var'}\n  database:\n    dsn: '{database_dsn}'\n"
        # Cheap hashing keeps the CLI quick in tests; the defaults are RFC 9106's.
        "security:\n  auth:\n    argon2: {time_cost: 1, memory_cost_kib: 8192, parallelism: 1}\n"
    )
    return path


def ok(*args: str, config: Path, stdin: str = "") -> str:
    result = run_esp(*args, config=config, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_domain_user_alias_round_trip(config: Path, scratch: Path, database_dsn: str) -> None:
    assert "domain example.test added" in ok("domain", "add", "Example.Test", config=config)
    out = ok("user", "add", "alice@example.test", "--password-stdin", "--quota", "2G",
             "--name", "Alice", config=config, stdin=PASSWORD)
    assert "user alice@example.test added" in out
    assert (scratch / "var" / "maildir" / "example.test" / "alice" / "new").is_dir()
    ok("alias", "add", "postmaster@example.test", "alice@example.test", config=config)
    ok("alias", "add", "@example.test", "alice@example.test", config=config)

    users = json.loads(ok("user", "list", "--json", config=config))
    assert [(u["address"], u["quota_bytes"], u["display_name"]) for u in users] == [
        ("alice@example.test", 2 * 1024**3, "Alice")
    ]
    assert "password_hash" not in users[0]
    aliases = ok("alias", "list", "example.test", config=config)
    assert "postmaster@example.test\talice@example.test" in aliases
    assert "@example.test\talice@example.test" in aliases
    domains = ok("domain", "list", config=config)
    assert domains.startswith("example.test\t1 users\t2 aliases")

    ok("user", "passwd", "alice@example.test", "--password-stdin", config=config,
       stdin="another good one\n")
    ok("alias", "remove", "@example.test", config=config)
    ok("user", "remove", "alice@example.test", config=config)
    ok("domain", "remove", "example.test", config=config)
    assert ok("domain", "list", config=config) == ""

    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, action, target FROM audit_log ORDER BY id")
        rows = cur.fetchall()
    assert [r[1] for r in rows] == [
        "domain.add", "user.add", "alias.add", "alias.add", "user.passwd", "alias.remove",
        "user.remove", "domain.remove",
    ]
    assert all(r[0].startswith("cli:") for r in rows)


def test_password_is_stored_as_argon2id_never_in_clear(config: Path, database_dsn: str) -> None:
    ok("domain", "add", "example.test", config=config)
    ok("user", "add", "bob@example.test", "--password-stdin", config=config, stdin=PASSWORD)
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT password_hash FROM users")
        (encoded,) = cur.fetchone()
    assert encoded.startswith("$argon2id$")
    assert "correct horse" not in encoded


@pytest.mark.parametrize(
    "setup, args, stdin, status, message",
    [
        ([], ("user", "add", "alice@nowhere.test", "--password-stdin"), PASSWORD, 1,
         "nowhere.test is not hosted here"),
        ([("domain", "add", "example.test")], ("domain", "add", "example.test"), "", 1,
         "already exists"),
        ([("domain", "add", "example.test"), ("user", "add", "a@example.test")],
         ("user", "add", "A@example.test", "--password-stdin"), PASSWORD, 1, "already exists"),
        ([], ("user", "add", "not-an-address", "--password-stdin"), PASSWORD, 2, "bad address"),
        ([], ("domain", "add", "under_score.test"), "", 2, "label"),
        ([("domain", "add", "example.test")],
         ("user", "add", "a@example.test", "--password-stdin"), "short\n", 2, "at least 8"),
        ([("domain", "add", "example.test")], ("user", "add", "a@example.test"), "", 2,
         "--password-stdin"),
        ([], ("user", "passwd", "ghost@example.test", "--password-stdin"), PASSWORD, 1,
         "no user ghost@example.test"),
        ([], ("domain", "remove", "example.test"), "", 1, "not hosted"),
        ([("domain", "add", "example.test"), ("user", "add", "a@example.test")],
         ("domain", "remove", "example.test"), "", 1, "still has 1 user"),
        ([("domain", "add", "example.test")],
         ("alias", "add", "x@example.test", "ghost@example.test"), "", 1,
         "neither a user nor an alias"),
        ([("domain", "add", "example.test")], ("alias", "remove", "x@example.test"), "", 1,
         "no alias"),
        ([], ("user", "frobnicate"), "", 2, "invalid choice"),
        ([], ("user", "add", "a@example.test", "--quota", "lots"), "", 2, "not a size"),
    ],
)
def test_error_paths_exit_non_zero_with_a_clear_message(
    config: Path, setup: list[tuple[str, ...]], args: tuple[str, ...], stdin: str,
    status: int, message: str, database_dsn: str,
) -> None:
    for step in setup:
        extra = ("--password-stdin",) if step[:2] == ("user", "add") else ()
        ok(*step, *extra, config=config, stdin=PASSWORD)
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM audit_log), (SELECT count(*) FROM users)")
        before = cur.fetchone()
    result = run_esp(*args, config=config, stdin=stdin)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert message in result.stderr
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM audit_log), (SELECT count(*) FROM users)")
        assert cur.fetchone() == before  # a refused command changes nothing


def test_bad_configuration_exits_78_naming_the_key(scratch: Path) -> None:
    path = scratch / "bad.yaml"
    path.write_text("storage:\n  databse: {}\n")
    result = run_esp("domain", "list", config=path)
    assert result.returncode == 78
    assert "storage.databse: unknown key" in result.stderr


def test_unreachable_database_exits_69(scratch: Path) -> None:
    path = scratch / "esp.yaml"
    path.write_text(
        f"storage:\n  database:\n    dsn: 'host={scratch} port=1 dbname=esp connect_timeout=2'\n"
    )
    result = run_esp("domain", "list", config=path)
    assert result.returncode == 69
    assert "cannot connect to PostgreSQL" in result.stderr


def test_environment_dsn_override_is_used(scratch: Path, database_dsn: str) -> None:
    path = scratch / "esp.yaml"
    path.write_text("storage:\n  database:\n    dsn: 'host=/nonexistent dbname=nothing'\n")
    result = run_esp("domain", "add", "env.test", config=path,
                     env={"ESP_DATABASE_DSN": database_dsn})
    assert result.returncode == 0, result.stderr
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM domains")
        assert cur.fetchall() == [("env.test",)]


def test_password_is_prompted_for_twice_on_a_terminal(config: Path, database_dsn: str) -> None:
    ok("domain", "add", "example.test", config=config)
    child = pexpect.spawn(
        program("esp"), ["--config", str(config), "user", "add", "tty@example.test"],
        timeout=60, encoding="utf-8",
    )
    child.expect("New password for tty@example.test: ")
    child.sendline("typed at the terminal")
    child.expect("Repeat it: ")
    child.sendline("typed at the terminal")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "typed at the terminal" not in (child.before or "")  # not echoed

    mismatch = pexpect.spawn(
        program("esp"), ["--config", str(config), "user", "add", "tty2@example.test"],
        timeout=60, encoding="utf-8",
    )
    mismatch.expect("New password")
    mismatch.sendline("first version!")
    mismatch.expect("Repeat it: ")
    mismatch.sendline("second version")
    mismatch.expect(pexpect.EOF)
    mismatch.close()
    assert mismatch.exitstatus == 2
    assert "the two passwords differ" in (mismatch.before or "")
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT localpart FROM users ORDER BY localpart")
        assert cur.fetchall() == [("tty",)]


def test_webhooks_are_added_listed_and_removed(config: Path, database_dsn: str) -> None:
    refused = run_esp("webhook", "add", "http://10.1.2.3/hook", "--event", "message.*",
                      config=config)
    assert refused.returncode == 2 and "not a public address" in refused.stderr
    config.write_text(config.read_text()
                      + "events:\n  webhooks:\n    allow_networks: ['127.0.0.0/8']\n")
    ok("domain", "add", "example.test", config=config)
    added = ok("webhook", "add", "http://127.0.0.1:9/hook", "--event", "message.*",
               "--event", "user.login", "--domain", "example.test", config=config)
    secret = added.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    listed = ok("webhook", "list", config=config)
    assert listed.startswith("1\thttp://127.0.0.1:9/hook\tmessage.*,user.login\tdomain example.test")
    assert secret not in listed
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT action FROM audit_log WHERE action LIKE 'webhook.%' ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == ["webhook.create"]
    assert "removed" in ok("webhook", "remove", "1", config=config)
    assert ok("webhook", "list", config=config) == ""
    again = run_esp("webhook", "remove", "1", config=config)
    assert again.returncode == 1 and "no webhook 1" in again.stderr
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_log WHERE action = 'webhook.remove'")
        assert cur.fetchone() == (1,)  # the refused second removal wrote nothing
