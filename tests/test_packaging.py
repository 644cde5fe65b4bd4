"""Packaging: a built wheel carries the plugin and the schema, and `pip install .` works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(build), "TMPDIR": str(build)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("esp-*.whl")
    return built


def test_wheel_has_the_plugin_without_claiming_the_twisted_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/esp_plugin.py" in names
    assert "twisted/__init__.py" not in names  # would shadow Twisted itself
    assert "twisted/plugins/__init__.py" not in names
    assert "esp/tap.py" in names and "esp/storage/migrations.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_carries_every_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for sql in sorted((REPO / "sql").glob("*.sql")):
        assert any(n.endswith(f".data/data/share/esp/sql/{sql.name}") for n in names), sql.name


def test_a_plain_install_finds_its_schema_and_plugin(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    probe = subprocess.run(
        [str(python), "-c",
         "import esp, esp.storage.migrations as m, twisted.plugins, twisted.plugin as p;"
         "from twisted.application.service import IServiceMaker;"
         "print(esp.__file__); print(m.schema_dir());"
         "print([s.tapname for s in p.getPlugins(IServiceMaker, twisted.plugins)])"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    module, schema, plugins = probe.stdout.splitlines()
    assert module.startswith(str(venv))
    assert schema == str(venv / "share" / "esp" / "sql")
    assert "'esp'" in plugins


def test_dropin_cache_is_ignored() -> None:
    assert "dropin.cache" in (REPO / ".gitignore").read_text().split()
