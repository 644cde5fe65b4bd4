"""The embedded PostgreSQL cluster: a private server under ``<data_dir>/pg`` on a unix socket.

With no ``storage.database.dsn`` ESP runs its own cluster, made with ``initdb`` on first start and
reused afterwards.  It listens on no TCP port; the socket directory is private to the account
that runs it.  initdb refuses to run as root, so when ESP runs as root the cluster runs as an
existing unprivileged account (``storage.database.embedded.run_as``), never one created silently.

Everything here blocks (it runs programs and waits for them): the service calls it from a thread,
the CLI calls it directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions

DATABASE_NAME = "esp"
SUPERUSER = "esp"
_PORT = 5432  # names the socket file only; no TCP port is opened
# sun_path holds 107 bytes on Linux; keep room for ".s.PGSQL.5432.lock".
_MAX_SOCKET_DIR = 85


class ClusterError(Exception):
    """The embedded cluster cannot be created, started or stopped; the message says why."""


@dataclass(frozen=True)
class PostgresBinaries:
    bin_dir: Path

    def path(self, program: str) -> str:
        return str(self.bin_dir / program)

    def major_version(self) -> int:
        out = subprocess.run(
            [self.path("pg_ctl"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if match is None:
            raise ClusterError(f"cannot read the PostgreSQL version from {out!r}")
        return int(match.group(1))


def _has_programs(directory: Path) -> bool:
    return all(os.access(directory / p, os.X_OK) for p in ("initdb", "pg_ctl", "postgres"))


def find_binaries(configured: Path | None = None) -> PostgresBinaries:
    """Find initdb, pg_ctl and postgres: config, PATH, pg_config, Debian's layout, pgserver."""
    if configured is not None:
        if not _has_programs(configured):
            raise ClusterError(
                f"storage.database.embedded.bin_dir = {configured}: no initdb, pg_ctl and "
                "postgres there"
            )
        return PostgresBinaries(configured)
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))

    def version_key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name))

    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    )
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    for candidate in candidates:
        if _has_programs(candidate):
            return PostgresBinaries(candidate)
    raise ClusterError(
        "no PostgreSQL server programs (initdb, pg_ctl, postgres) found on PATH, through "
        "pg_config, under /usr/lib/postgresql/*/bin or in the pgserver package; install "
        "PostgreSQL (Debian: apt-get install postgresql), or `pip install 'esp[embedded-pg]'`, "
        "or set storage.database.dsn to an existing server"
    )


class EmbeddedCluster:
    """A private PostgreSQL cluster in ``directory`` (``<data_dir>/pg``)."""

    def __init__(
        self,
        directory: Path,
        bin_dir: Path | None = None,
        run_as: str = "postgres",
        startup_timeout: int = 60,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self._extra_settings = dict(extra_settings or {})
        self.pgdata = directory / "data"
        self.logfile = directory / "postgresql.log"
        self._bin_dir = bin_dir
        self._timeout = startup_timeout
        self._run_as = run_as
        self._binaries: PostgresBinaries | None = None
        self._lock_fd: int | None = None

    @property
    def _account(self) -> pwd.struct_passwd | None:
        # Decided when used, not when built: twistd --uid drops root between the two.
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self._run_as)
        except KeyError:
            return None

    # -- who may stop it -------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.directory.with_name(self.directory.name + ".lock")

    def try_own(self) -> bool:
        """Take the cluster's ownership lock without waiting; True if we now own it.

        The owner (the running ESP, or a CLI command while ESP is not running) is the only one
        that stops the cluster, so a CLI command never stops the cluster under a running ESP.
        """
        if self._lock_fd is not None:
            return True
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def own(self, timeout: float) -> None:
        """Wait (blocking, in a thread) up to ``timeout`` seconds for the ownership lock."""
        deadline = time.monotonic() + timeout
        while not self.try_own():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"another ESP process holds {self.lock_path}: only one ESP may run the "
                    "embedded cluster of a data directory"
                )
            time.sleep(0.1)

    def disown(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- where things are -------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        local = self.directory / "run"
        if len(str(local)) <= _MAX_SOCKET_DIR:
            return local
        # A deep data directory would overflow sun_path: use a short private directory instead,
        # named after the cluster so the same cluster always gets the same one.
        digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"esp-pg-{digest}"

    @property
    def dsn(self) -> str:
        return (
            f"host={self.socket_dir} port={_PORT} dbname={DATABASE_NAME} user={SUPERUSER} "
            "connect_timeout=10"
        )

    @property
    def binaries(self) -> PostgresBinaries:
        if self._binaries is None:
            self._binaries = find_binaries(self._bin_dir)
        return self._binaries

    # -- life cycle -------------------------------------------------------------------------

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        result = self._run(["pg_ctl", "-D", str(self.pgdata), "status"], check=False)
        return result.returncode == 0

    def start(self) -> bool:
        """Create the cluster if needed and start it; False if it was already running."""
        self._check_account()
        self._prepare_directories()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._check_version()
        self._write_settings()
        if self.is_running():
            self._ensure_database()
            return False
        result = self._run(
            [
                "pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile),
                "-w", "-t", str(self._timeout), "start",
            ],
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}; see {self.logfile}"
            )
        self._ensure_database()
        return True

    def stop(self) -> None:
        """Stop the cluster with a fast shutdown (clients are disconnected, data is safe)."""
        if not self.is_running():
            return
        result = self._run(
            ["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"PostgreSQL did not stop: {result.stderr.strip()}")

    # -- details ----------------------------------------------------------------------------

    def _check_account(self) -> None:
        if os.geteuid() != 0:
            return
        if not _exists(self._run_as):
            raise ClusterError(
                "ESP runs as root and initdb refuses root: the embedded PostgreSQL cluster runs "
                f"as the account {self._run_as!r}, which does not exist. Create an unprivileged "
                "account and name it in storage.database.embedded.run_as (Debian's postgresql "
                "package creates 'postgres'), run ESP as a normal user, or set "
                "storage.database.dsn"
            )
        if shutil.which("runuser") is None:
            raise ClusterError("running as root needs runuser (util-linux) to start PostgreSQL")

    def _prepare_directories(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_reachable(self.directory)
        self._own(self.directory, 0o700)
        socket_dir = self.socket_dir
        try:
            socket_dir.mkdir(mode=0o700, exist_ok=False)
        except FileExistsError:
            pass
        info = socket_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (self._uid, os.geteuid()):
            raise ClusterError(f"{socket_dir} exists and is not ours: refusing to use it")
        self._own(socket_dir, 0o700)

    @property
    def _uid(self) -> int:
        return self._account.pw_uid if self._account is not None else os.geteuid()

    def _own(self, path: Path, mode: int) -> None:
        account = self._account
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(path, mode)

    def _check_reachable(self, path: Path) -> None:
        """As root, every directory above the cluster must let the cluster's account through."""
        account = self._account
        if account is None:
            return
        for parent in [path, *path.parents]:
            info = parent.stat()
            if info.st_uid == account.pw_uid:
                continue
            bits = stat.S_IXGRP if info.st_gid == account.pw_gid else stat.S_IXOTH
            if not info.st_mode & bits:
                raise ClusterError(
                    f"the embedded PostgreSQL runs as {self._run_as!r}, which cannot reach "
                    f"{path}: {parent} is mode {stat.S_IMODE(info.st_mode):04o}. Choose a "
                    "storage.data_dir that account can reach, or open that directory (o+x)"
                )

    def _initdb(self) -> None:
        # initdb into a fresh directory, renamed into place only when complete: a crash during
        # initdb leaves no half-made cluster that would later refuse to start.
        staging = self.directory / "data.initdb"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        self._own(staging, 0o700)
        result = self._run(
            [
                "initdb", "-D", str(staging), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--no-locale", "--data-checksums",
            ],
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise ClusterError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        with open(staging / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# ESP writes its settings here at every start.\n")
            conf.write("include_if_exists = 'esp.conf'\n")
        os.rename(staging, self.pgdata)

    def _check_version(self) -> None:
        on_disk = int((self.pgdata / "PG_VERSION").read_text().strip().split(".")[0])
        programs = self.binaries.major_version()
        if on_disk != programs:
            raise ClusterError(
                f"the cluster in {self.pgdata} was made by PostgreSQL {on_disk}, but the programs "
                f"in {self.binaries.bin_dir} are PostgreSQL {programs}; point "
                "storage.database.embedded.bin_dir at PostgreSQL "
                f"{on_disk} or upgrade the cluster with pg_upgrade"
            )

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "unix_socket_permissions": "0700",
            "port": str(_PORT),
            # Durability is the point: a 250 after DATA means committed to disk.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            **self._extra_settings,
        }
        path = self.pgdata / "esp.conf"
        path.write_text(
            "# Written by ESP at every start; edits here are overwritten.\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items()),
            encoding="utf-8",
        )
        self._own(path, 0o600)

    def _ensure_database(self) -> None:
        dsn = self.dsn.replace(f"dbname={DATABASE_NAME}", "dbname=postgres")
        connection = psycopg2.connect(dsn)
        try:
            connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            with connection.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE_NAME}")
        finally:
            connection.close()

    def _run(self, argv: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        command = [self.binaries.path(argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self._run_as, "--", *command]
        # pg_ctl start leaves the server running with our stdout/stderr unless redirected.
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=check,
            cwd="/",
        )


def _exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True
