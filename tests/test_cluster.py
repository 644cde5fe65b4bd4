"""The embedded PostgreSQL cluster: made once, reused, private, and clear about what is wrong."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted

from esp.storage.cluster import ClusterError, EmbeddedCluster, find_binaries
from tests.helpers import run_esp


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


def test_a_running_esp_owns_the_cluster_and_the_cli_leaves_it_running(scratch: Path) -> None:
    config = scratch / "esp.yaml"
    config.write_text("storage:\n  data_dir: var\n")
    daemon = EmbeddedCluster(scratch / "var" / "pg")  # stands for the running ESP
    assert daemon.try_own()
    try:
        assert not EmbeddedCluster(scratch / "var" / "pg").try_own()  # one owner at a time
        # Owned but not running (ESP starting or stopping): the CLI does not touch it.
        result = run_esp("domain", "list", config=config)
        assert result.returncode == 69
        assert "try again shortly" in result.stderr
        daemon.start()
        result = run_esp("domain", "add", "owned.test", config=config)
        assert result.returncode == 0, result.stderr
        assert daemon.is_running()  # the CLI used it and left it running
    finally:
        daemon.stop()
        daemon.disown()
    assert EmbeddedCluster(scratch / "var" / "pg").try_own()


@pytest_twisted.ensureDeferred
async def test_a_stop_during_start_up_leaves_no_postgresql_behind(scratch: Path) -> None:
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from esp.service import EmbeddedClusterService

    cluster = EmbeddedCluster(scratch / "var" / "pg")
    pool = ThreadPool(minthreads=1, maxthreads=1)
    pool.start()
    try:
        service = EmbeddedClusterService(cluster, reactor, pool, timeout=30)
        starting = service.startService()  # initdb and start run in the pool's thread...
        stopped = service.stopService()  # ...and the stop arrives at once
        starting.cancel()
        await stopped
    finally:
        pool.stop()
    assert (cluster.pgdata / "PG_VERSION").exists()  # the start did finish...
    assert not cluster.is_running()  # ...and was then stopped
    assert cluster.try_own()  # and the ownership lock was given back
    cluster.disown()
