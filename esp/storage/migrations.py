"""Schema migrations: numbered SQL files applied in order, once, and recorded.

``sql/NNN_name.sql`` files are applied at start-up in one transaction under an advisory lock, so
several nodes starting together apply each file exactly once.  A recorded file whose text has
changed, or a database that knows a newer schema than this code, stops start-up: a landed
migration is never edited, and old code must not run against a schema it does not know.
"""

from __future__ import annotations

import hashlib
import re
import site
import sys
from dataclasses import dataclass
from pathlib import Path

from esp.storage.db import Cursor

# Arbitrary constant shared by every ESP node: the key of the migration advisory lock.
_MIGRATION_LOCK_KEY = 0x45535001
_FILE_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """The schema cannot be brought to the version this code expects."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def schema_dir() -> Path:
    """Where the ``sql/`` files are: the source checkout, else ``<prefix>/share/esp/sql``."""
    candidates = [
        Path(__file__).resolve().parents[2] / "sql",
        Path(sys.prefix) / "share" / "esp" / "sql",
        Path(site.getuserbase()) / "share" / "esp" / "sql",
    ]
    for candidate in candidates:
        if any(candidate.glob("*.sql")):
            return candidate
    raise MigrationError(
        "cannot find the schema files (sql/*.sql); looked in "
        + ", ".join(str(c) for c in candidates)
    )


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read and check the migration files, in version order."""
    directory = directory or schema_dir()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is used twice")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    migrations = [found[v] for v in sorted(found)]
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise MigrationError(f"{directory}: migration versions must run 1, 2, 3... without gaps")
    return migrations


def apply_migrations_txn(cur: Cursor, migrations: list[Migration]) -> list[int]:
    """Apply what is missing; return the versions applied now (empty when up to date)."""
    # Bounded waits: a stuck peer or a long-running query must not hang start-up for ever.
    cur.execute("SET LOCAL lock_timeout = '120s'")
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
    cur.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    cur.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    applied = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    known = {m.version: m for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        raise MigrationError(
            f"the database schema is at version {max(applied)}, newer than this ESP knows "
            f"({max(known, default=0)}); upgrade ESP or point it at another database"
        )
    for version, (name, checksum) in applied.items():
        if known[version].checksum != checksum:
            raise MigrationError(
                f"migration {version:03d}_{name}.sql was changed after it was applied; "
                "landed migrations must never be edited (add a new one instead)"
            )
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        cur.execute(migration.sql)
        cur.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )
        done.append(migration.version)
    return done
