"""Configuration: defaults, validation messages that name the key, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from esp.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "esp.yaml"
    path.write_text(text)
    return path


def test_defaults_run_on_one_machine_without_root(tmp_path: Path) -> None:
    config = load_config(None, environ={}, cwd=tmp_path)
    assert config.data_dir == (tmp_path / "var").resolve()
    assert config.maildir_root == config.data_dir / "maildir"
    assert config.embedded_database
    ports = [
        int(e.split(":")[1])
        for e in (
            *config.server.smtp.mx.listen,
            *config.server.smtp.submission.listen,
            *config.server.smtp.submissions.listen,
            *config.server.imap.listen,
            *config.server.imap.listen_tls,
            *config.server.api.listen,
            *config.server.metrics.listen,
        )
    ]
    assert all(p >= 1024 for p in ports)
    assert config.security.auth.allow_plaintext_on_loopback is False


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(None, environ={}, cwd=tmp_path)
    with pytest.raises(Exception, match="frozen"):
        config.server.hostname = "other.example"  # type: ignore[misc]


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  smtp:\n    max_mesage_size: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "server.smtp.max_mesage_size: unknown key" in message
    assert "max_message_size" in message  # what is allowed there
    assert str(path) in message


def test_bad_value_names_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  smtp:\n    max_message_size: huge\n"
        "storage:\n  database:\n    pool_max: 0\n"
        "security:\n  tls:\n    min_version: '1.0'\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "server.smtp.max_message_size: 'huge' is not allowed" in message
    assert "integer" in message
    assert "storage.database.pool_max: 0 is not allowed" in message
    assert "greater than or equal to 1" in message
    assert "security.tls.min_version: '1.0' is not allowed" in message
    assert "'1.2' or '1.3'" in message


def test_bad_listen_endpoint_is_refused_without_binding(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  imap:\n    listen: 'tcp:notaport'\n")
    with pytest.raises(ConfigError, match=r"server\.imap\.listen\[0\]: 'tcp:notaport'"):
        load_config(path, environ={})


def test_listen_accepts_one_string_or_a_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  api:\n    listen: 'tcp:8081:interface=127.0.0.1'\n"
        "  imap:\n    listen: ['tcp:1143:interface=127.0.0.1', 'tcp:1143:interface=\\:\\:1']\n",
    )
    config = load_config(path, environ={})
    assert config.server.api.listen == ("tcp:8081:interface=127.0.0.1",)
    assert len(config.server.imap.listen) == 2


def test_invalid_yaml_and_wrong_top_level_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, "storage:\n  data_dir: data\n  maildir:\n    root: ../mail\n")
    config = load_config(path, environ={}, cwd=Path("/"))
    assert config.data_dir == (sub / "data").resolve()
    assert config.maildir_root == (tmp_path / "mail").resolve()


def test_environment_overrides_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  database:\n    dsn: host=/nowhere dbname=x\n")
    config = load_config(
        path, environ={"ESP_DATABASE_DSN": "host=/run/pg dbname=esp", "ESP_HOSTNAME": "Mx.Example.TEST"}
    )
    assert config.storage.database.dsn == "host=/run/pg dbname=esp"
    assert not config.embedded_database
    assert config.server.hostname == "mx.example.test"


def test_environment_override_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.hostname: 'bad host!' is not allowed"):
        load_config(None, environ={"ESP_HOSTNAME": "bad host!"}, cwd=tmp_path)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={})
    assert config.data_dir == (tmp_path / "var").resolve()
