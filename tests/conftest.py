"""Shared fixtures: a real private PostgreSQL cluster, per-test databases, scratch directories.

One cluster serves the whole session (made with the same :class:`EmbeddedCluster` code ESP uses).
A template database is migrated once and every test gets a copy of it (``CREATE DATABASE ...
TEMPLATE``), which takes milliseconds.  Nothing here skips: a missing PostgreSQL fails the test
with a message saying what to install.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

from esp.storage.cluster import ClusterError, EmbeddedCluster, find_binaries
from esp.storage.db import run_sync
from esp.storage.migrations import apply_migrations_txn, load_migrations
from tests.dnszone import DNSServer, start_dns
from tests.filterservices import Service, start_clamd, start_rspamd

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "esp_template"
_names = itertools.count(1)


@pytest.fixture(scope="session")
def scratch_root() -> Iterator[Path]:
    """A temporary directory the embedded cluster's account can reach (pytest's tmp_path is 0700
    and owned by root, which the 'postgres' account cannot enter when the tests run as root)."""
    root = Path(tempfile.mkdtemp(prefix="esp-tests-"))
    os.chmod(root, 0o711)  # noqa: S103 (the cluster's account must traverse it)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch(scratch_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one test, below :func:`scratch_root`."""
    path = scratch_root / f"t{next(_names)}"
    path.mkdir(mode=0o711)
    return path


@pytest.fixture(scope="session")
def test_dns(scratch_root: Path) -> Iterator[DNSServer]:
    """A real DNS server (twistd dns) with the test zones, for the whole session."""
    directory = scratch_root / "dns"
    directory.mkdir()
    server = start_dns(directory)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture(scope="session")
def rspamd(scratch_root: Path, test_dns: DNSServer) -> Iterator[Service]:
    """A real Rspamd for the session (its hyperscan cache kept between runs: a cold start
    compiles for seconds)."""
    service = start_rspamd(scratch_root / "rspamd", test_dns.port,
                           Path.home() / ".cache" / "esp-tests" / "rspamd-hs")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def clamd(scratch_root: Path) -> Iterator[Service]:
    """A real clamd for the session, with a signature file of our own."""
    service = start_clamd(scratch_root / "clamd")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def pg_cluster(scratch_root: Path) -> Iterator[EmbeddedCluster]:
    try:
        find_binaries()
    except ClusterError as e:
        pytest.fail(f"the tests need a PostgreSQL server installation: {e}")
    # The tests' own cluster trades crash safety of PostgreSQL itself for speed (a database per
    # test); ESP's clusters always run with fsync on.
    cluster = EmbeddedCluster(
        scratch_root / "cluster" / "pg",
        extra_settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    cluster.start()
    yield cluster
    cluster.stop()


def _admin(cluster: EmbeddedCluster) -> psycopg2.extensions.connection:
    connection = psycopg2.connect(cluster.dsn.replace("dbname=esp", "dbname=postgres"))
    connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    return connection


def dsn_for(cluster: EmbeddedCluster, name: str) -> str:
    return cluster.dsn.replace("dbname=esp", f"dbname={name}")


@pytest.fixture(scope="session")
def template_database(pg_cluster: EmbeddedCluster) -> str:
    admin = _admin(pg_cluster)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        cur.execute(f"CREATE DATABASE {TEMPLATE}")
    admin.close()
    connection = psycopg2.connect(dsn_for(pg_cluster, TEMPLATE))
    run_sync(connection, apply_migrations_txn, load_migrations())
    connection.close()
    return TEMPLATE


def _new_database(cluster: EmbeddedCluster, template: str | None) -> str:
    name = f"test_{os.getpid()}_{next(_names)}"
    admin = _admin(cluster)
    # FILE_COPY (PostgreSQL 15+) skips writing the whole template to the WAL: much faster.
    strategy = " STRATEGY FILE_COPY" if admin.server_version >= 150000 else ""
    with admin.cursor() as cur:
        if template:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {template}{strategy}")
        else:
            cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    return name


def _drop_database(cluster: EmbeddedCluster, name: str) -> None:
    admin = _admin(cluster)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def database_dsn(pg_cluster: EmbeddedCluster, template_database: str) -> Iterator[str]:
    """A database of its own for one test, with the current schema."""
    name = _new_database(pg_cluster, template_database)
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture(scope="module")
def module_database_dsn(pg_cluster: EmbeddedCluster, template_database: str) -> Iterator[str]:
    """A database shared by the tests of one module (for a server process they share)."""
    name = _new_database(pg_cluster, template_database)
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture(scope="module")
def module_scratch(scratch_root: Path, request: pytest.FixtureRequest) -> Path:
    path = scratch_root / f"m{next(_names)}"
    path.mkdir(mode=0o711)
    return path


@pytest.fixture
def blank_database_dsn(pg_cluster: EmbeddedCluster) -> Iterator[str]:
    """An empty database (no schema), for migration tests."""
    name = _new_database(pg_cluster, None)
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture
def connection(database_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(database_dsn)
    yield conn
    conn.close()
