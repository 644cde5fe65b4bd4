"""The embedded PostgreSQL cluster: made once, reused, private, and clear about what is wrong."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg2
import pytest

from esp.storage.cluster import ClusterError, EmbeddedCluster, find_binaries


def test_binaries_are_found_and_report_their_version() -> None:
    binaries = find_binaries()
    assert binaries.major_version() >= 13
    for program in ("initdb", "pg_ctl", "postgres"):
        assert os.access(binaries.bin_dir / program, os.X_OK)


def test_a_configured_bin_dir_without_postgres_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no initdb, pg_ctl and postgres there"):
        find_binaries(tmp_path)


def test_cluster_in_a_deep_directory_uses_a_short_private_socket_dir(scratch: Path) -> None:
    deep = scratch / ("d" * 60) / ("e" * 40) / "pg"
    cluster = EmbeddedCluster(deep)
    assert not str(cluster.socket_dir).startswith(str(deep))
    try:
        assert cluster.start() is True
        info = cluster.socket_dir.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        with psycopg2.connect(cluster.dsn) as conn, conn.cursor() as cur:
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone() == ("",)  # no TCP at all
            cur.execute("SHOW fsync")
            assert cur.fetchone() == ("on",)
            cur.execute("SHOW data_checksums")
            assert cur.fetchone() == ("on",)
        assert cluster.start() is False  # already running: reused, not started twice
    finally:
        cluster.stop()
    assert not cluster.is_running()
    assert stat.S_IMODE(cluster.directory.stat().st_mode) == 0o700


def test_a_cluster_of_another_major_version_is_refused(scratch: Path) -> None:
    data = scratch / "pg" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("9\n")
    with pytest.raises(ClusterError, match="made by PostgreSQL 9, but the programs"):
        EmbeddedCluster(scratch / "pg").start()


def test_a_planted_socket_directory_is_refused(scratch: Path, tmp_path: Path) -> None:
    # The short socket directory lives in the shared /tmp: another local user could plant a
    # symlink there to steer our socket elsewhere.
    deep = scratch / ("f" * 100) / "pg"
    cluster = EmbeddedCluster(deep)
    cluster.socket_dir.symlink_to(tmp_path)
    try:
        with pytest.raises(ClusterError, match="exists and is not ours"):
            cluster.start()
    finally:
        cluster.socket_dir.unlink()
