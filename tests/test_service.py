"""ESP as an operator runs it: `twistd esp`, `twistd -y esp.tac`, the CLI beside it, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from esp.storage.cluster import EmbeddedCluster
from tests.helpers import REPO, program, run_esp, start_twistd

READY = "ready: host"
# Ephemeral ports, so tests never collide with each other or with a running ESP.
EPHEMERAL = (
    "server:\n  dns: {nameservers: ['127.0.0.1:9']}\n  smtp:\n"
    "    mx: {listen: 'tcp:0:interface=127.0.0.1'}\n"
    "    submission: {listen: 'tcp:0:interface=127.0.0.1'}\n"
    "    submissions: {listen: 'tcp:0:interface=127.0.0.1'}\n"
    "  imap: {listen: 'tcp:0:interface=127.0.0.1', listen_tls: 'tcp:0:interface=127.0.0.1'}\n"
)
# twistd ends by re-raising the signal it was stopped with, as service managers expect.
STOPPED = (0, -signal.SIGTERM)


def embedded_config(scratch: Path) -> Path:
    path = scratch / "esp.yaml"
    path.write_text(
        EPHEMERAL + "  hostname: mx.example.test\n"
        "storage:\n  data_dir: var\n"
        "security:\n  auth:\n    argon2: {time_cost: 1, memory_cost_kib: 8192, parallelism: 1}\n"
    )
    return path


def test_twistd_lists_esp() -> None:
    result = subprocess.run(
        [program("twistd"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    lines = [line.split() for line in result.stdout.splitlines()]
    assert any(parts[:1] == ["esp"] for parts in lines), result.stdout
    assert "Traceback" not in result.stderr


def test_embedded_instance_serves_the_cli_and_keeps_data_across_restarts(scratch: Path) -> None:
    config = embedded_config(scratch)
    server = start_twistd("esp", "--config", str(config))
    try:
        ready = server.wait_for(READY)
        assert f"data {scratch / 'var'}" in ready
        assert "database embedded" in ready
        assert run_esp("domain", "add", "example.test", config=config).returncode == 0
        added = run_esp("user", "add", "alice@example.test", "--password-stdin",
                        config=config, stdin="correct horse\n")
        assert added.returncode == 0, added.stderr
    finally:
        status = server.stop()
    assert status in STOPPED, server.log
    assert "stopping embedded PostgreSQL" in server.log
    assert "Server Shut Down." in server.log
    cluster = EmbeddedCluster(scratch / "var" / "pg")
    assert not cluster.is_running()  # SIGTERM stopped the cluster too

    server = start_twistd("esp", "--config", str(config))
    try:
        server.wait_for(READY)
        listed = run_esp("user", "list", config=config)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("alice@example.test\t")
        assert cluster.is_running()  # the CLI used the running instance's cluster...
    finally:
        assert server.stop() in STOPPED, server.log
    assert not cluster.is_running()


def test_cli_works_when_esp_is_not_running_and_leaves_the_cluster_stopped(
    scratch: Path,
) -> None:
    config = embedded_config(scratch)
    result = run_esp("domain", "add", "example.test", config=config)
    assert result.returncode == 0, result.stderr
    assert not EmbeddedCluster(scratch / "var" / "pg").is_running()
    assert run_esp("domain", "list", config=config).stdout.startswith("example.test")


def test_without_config_the_cli_and_twistd_use_esp_yaml_in_the_working_directory(
    scratch: Path, database_dsn: str
) -> None:
    (scratch / "esp.yaml").write_text(
        EPHEMERAL + f"storage:\n  database:\n    dsn: '{database_dsn}'\n"
    )
    result = subprocess.run(
        [program("esp"), "domain", "add", "cwd.test"],
        cwd=scratch, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    server = start_twistd("esp", cwd=scratch)
    try:
        line = server.wait_for(READY)
        assert "dbname=test_" in line  # the DSN from ./esp.yaml, not the embedded default
        assert "embedded" not in line
    finally:
        assert server.stop() in STOPPED, server.log


def test_tac_file_starts_the_same_service(scratch: Path, database_dsn: str) -> None:
    config = scratch / "tac.yaml"
    config.write_text(
        EPHEMERAL + f"storage:\n  data_dir: var\n  database:\n    dsn: '{database_dsn}'\n"
    )
    server = start_twistd("-y", str(REPO / "esp.tac"), env={"ESP_CONFIG": str(config)})
    try:
        line = server.wait_for(READY)
        assert f"data {scratch / 'var'}" in line
    finally:
        assert server.stop() in STOPPED, server.log


def test_configuration_error_stops_twistd_naming_the_key(scratch: Path) -> None:
    config = scratch / "bad.yaml"
    config.write_text("server:\n  smtp:\n    max_message_size: -5\n")
    result = subprocess.run(
        [program("twistd"), "-n", "--pidfile=", "esp", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "server.smtp.max_message_size: -5 is not allowed" in result.stdout + result.stderr


def test_tac_configuration_error_exits_non_zero(scratch: Path) -> None:
    config = scratch / "bad.yaml"
    config.write_text("events:\n  webhook: {}\n")
    result = subprocess.run(
        [program("twistd"), "-n", "--pidfile=", "-y", str(REPO / "esp.tac")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ESP_CONFIG": str(config)},
    )
    assert result.returncode != 0
    assert "events.webhook: unknown key" in result.stdout + result.stderr


def test_unreachable_database_makes_twistd_exit_1(scratch: Path) -> None:
    config = scratch / "esp.yaml"
    config.write_text(
        EPHEMERAL + f"storage:\n  data_dir: var\n  database:\n"
        f"    dsn: 'host={scratch} port=1 dbname=esp connect_timeout=2'\n"
    )
    server = start_twistd("esp", "--config", str(config))
    status = server.process.wait(timeout=120)
    server.stop()
    assert status == 1, server.log
    assert "start-up failed" in server.log


def test_as_root_a_missing_cluster_account_is_a_clear_error(scratch: Path) -> None:
    config = scratch / "esp.yaml"
    config.write_text(
        "storage:\n  data_dir: var\n  database:\n    embedded: {run_as: esp-no-such-user}\n"
    )
    result = run_esp("domain", "list", config=config)
    if os.geteuid() == 0:  # initdb refuses root: the cluster needs that account
        assert result.returncode == 69
        assert "'esp-no-such-user', which does not exist" in result.stderr
    else:  # as an ordinary user the cluster runs as that user; run_as does not matter
        assert result.returncode == 0, result.stderr


def test_as_root_an_unreachable_data_dir_is_a_clear_error(scratch: Path) -> None:
    private = scratch / "private"
    private.mkdir(mode=0o700)
    config = scratch / "esp.yaml"
    config.write_text(f"storage:\n  data_dir: {private / 'var'}\n")
    result = run_esp("domain", "list", config=config)
    if os.geteuid() == 0:
        assert result.returncode == 69
        assert f"{private} is mode 0700" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_readme_first_command_flow_on_defaults(scratch: Path) -> None:
    """The README's first command, run in an empty directory: defaults, data under ./var."""
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install"))
    assert first.endswith("&& twistd -n esp"), first
    server = start_twistd("esp", cwd=scratch)
    try:
        ready = server.wait_for(READY, timeout=120)
        assert f"data {scratch / 'var'}" in ready
        assert "database embedded" in ready
        for argv, stdin in [
            (("domain", "add", "example.test"), ""),
            (("user", "add", "alice@example.test", "--password-stdin"), "correct horse\n"),
        ]:
            result = subprocess.run(
                [program("esp"), *argv], cwd=scratch, input=stdin,
                capture_output=True, text=True, timeout=120,
            )
            assert result.returncode == 0, result.stderr
    finally:
        assert server.stop() in STOPPED, server.log
    server = start_twistd("esp", cwd=scratch)
    try:
        server.wait_for(READY, timeout=120)
        listed = subprocess.run(
            [program("esp"), "user", "list"], cwd=scratch, capture_output=True, text=True,
            timeout=120,
        )
        assert listed.stdout.startswith("alice@example.test\t"), listed.stderr
    finally:
        assert server.stop() in STOPPED, server.log


def test_after_a_crash_the_running_cluster_is_reused_and_stopped_later(scratch: Path) -> None:
    config = embedded_config(scratch)
    server = start_twistd("esp", "--config", str(config))
    server.wait_for(READY)
    server.stop(signal.SIGKILL)  # no clean shutdown: PostgreSQL keeps running
    cluster = EmbeddedCluster(scratch / "var" / "pg")
    assert cluster.is_running()
    server = start_twistd("esp", "--config", str(config))
    try:
        server.wait_for(READY)
        assert "already running, reused" in server.log
        assert run_esp("domain", "add", "after-crash.test", config=config).returncode == 0
    finally:
        assert server.stop() in STOPPED, server.log
    assert not cluster.is_running()
