"""Schema migrations against a real PostgreSQL: applied once, idempotent, guarded."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg2
import pytest

from esp.storage.db import run_sync
from esp.storage.migrations import (
    Migration,
    MigrationError,
    apply_migrations_txn,
    load_migrations,
    schema_dir,
)

REQUIRED_TABLES = {
    "domains", "users", "aliases", "mailboxes", "messages", "queue", "filter_rules",
    "webhooks", "audit_log", "schema_migrations",
}


def tables(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row[0] for row in cur.fetchall()}


def test_schema_files_are_found_and_ordered() -> None:
    migrations = load_migrations()
    assert schema_dir().name == "sql"
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial_schema"


def test_migrations_apply_once_then_nothing(blank_database_dsn: str) -> None:
    migrations = load_migrations()
    conn = psycopg2.connect(blank_database_dsn)
    first = run_sync(conn, apply_migrations_txn, migrations)
    second = run_sync(conn, apply_migrations_txn, migrations)
    conn.close()
    assert first == [m.version for m in migrations]
    assert second == []
    assert REQUIRED_TABLES <= tables(blank_database_dsn)
    with psycopg2.connect(blank_database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in cur.fetchall()) == first


def test_nodes_starting_together_apply_each_migration_once(blank_database_dsn: str) -> None:
    migrations = load_migrations()
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def node() -> None:
        conn = psycopg2.connect(blank_database_dsn)
        try:
            barrier.wait()
            results.append(run_sync(conn, apply_migrations_txn, migrations))
        except BaseException as e:
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=node) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=len) == [[], [], [m.version for m in migrations]]


def test_an_edited_migration_stops_start_up(blank_database_dsn: str) -> None:
    migrations = load_migrations()
    conn = psycopg2.connect(blank_database_dsn)
    run_sync(conn, apply_migrations_txn, migrations)
    edited = [Migration(1, migrations[0].name, migrations[0].sql + "\n-- edited\n")]
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        run_sync(conn, apply_migrations_txn, edited + migrations[1:])
    conn.close()


def test_a_schema_newer_than_the_code_is_refused(blank_database_dsn: str) -> None:
    migrations = load_migrations()
    conn = psycopg2.connect(blank_database_dsn)
    future = Migration(len(migrations) + 1, "from_the_future", "CREATE TABLE future (x int);")
    run_sync(conn, apply_migrations_txn, [*migrations, future])
    with pytest.raises(MigrationError, match="newer than this ESP knows"):
        run_sync(conn, apply_migrations_txn, migrations)
    conn.close()


def test_a_failing_migration_changes_nothing(blank_database_dsn: str) -> None:
    migrations = load_migrations()
    broken = Migration(
        len(migrations) + 1, "broken", "CREATE TABLE half_done (x int); SELECT * FROM nowhere;"
    )
    conn = psycopg2.connect(blank_database_dsn)
    with pytest.raises(psycopg2.errors.UndefinedTable):
        run_sync(conn, apply_migrations_txn, [*migrations, broken])
    conn.close()
    assert "half_done" not in tables(blank_database_dsn)
    assert "domains" not in tables(blank_database_dsn)  # one transaction: all or nothing


def test_badly_named_or_gapped_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "001_first.sql").write_text("SELECT 1;")
    (tmp_path / "003_third.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations(tmp_path)
    (tmp_path / "003_third.sql").unlink()
    (tmp_path / "2-second.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNN_name.sql"):
        load_migrations(tmp_path)
