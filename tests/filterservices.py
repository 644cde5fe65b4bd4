"""Real Rspamd and clamd for the filter tests, private to the test run: own configuration and
ports, no network (Rspamd's resolver is the test DNS server, its network modules are off;
clamd gets a signature file written here, no download).  See ../shared/REAL-SERVICES.md."""

from __future__ import annotations

import binascii
import collections
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

# Kept out of the repository as one literal, so that scanners do not flag the source.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
GTUBE = (b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X")

RSPAMD_OFF = ("rbl surbl fuzzy_check asn phishing multimap whitelist mid emails url_redirector "
              "mx_check spamassassin dcc external_services antivirus reputation neural "
              "greylist ratelimit replies history_redis bimi").split()


class Service:
    """A service process whose output (its log) is read by a thread as it comes: kept for
    error messages, and watched for the line that says it is listening."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, ready_line: bytes) -> None:
        self.process = process
        self.port = port
        self._ready_line = ready_line
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._lines: collections.deque[bytes] = collections.deque(maxlen=200)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)
            if self._ready_line in line:
                self.ready.set()
        self.ended.set()
        self.ready.set()  # wake the waiter: it sees the process gone

    def wait_ready(self, what: str, timeout: float = 120) -> None:
        if not self.ready.wait(timeout) or self.ended.is_set():
            self.stop()
            raise AssertionError(f"{what} did not start ({self.process.poll()}):\n"
                                 f"{self.tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.ended.wait(30)

    def tail(self) -> str:
        return b"".join(self._lines).decode("utf-8", "replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    assert found is not None, (f"{name} is not installed (apt-get install rspamd "
                               "clamav-daemon; .ci/run does)")
    return found


def start_rspamd(directory: Path, dns_port: int, hs_cache: Path) -> Service:
    directory.mkdir(parents=True, exist_ok=True)
    local = directory / "local.d"
    local.mkdir(exist_ok=True)
    hs_cache.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "db", "log"):
        (directory / sub).mkdir(exist_ok=True)
    port, controller = free_port(), free_port()
    (directory / "rspamd.conf").write_text(
        '.include "$CONFDIR/common.conf"\n'
        "options {\n"
        '    pidfile = "$RUNDIR/rspamd.pid";\n'
        '    .include "$CONFDIR/options.inc"\n'
        '    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"\n'
        "}\n"
        'logging { type = "console"; level = "info"; }\n'
        f'worker "normal" {{ bind_socket = "127.0.0.1:{port}"; '
        '.include "$CONFDIR/worker-normal.inc"; count = 1; }\n'
        f'worker "controller" {{ bind_socket = "127.0.0.1:{controller}"; '
        '.include "$CONFDIR/worker-controller.inc" }\n'
    )
    (local / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.5s; retransmits = 1; }}\n'
        f'hs_cache_dir = "{hs_cache}";\n')
    for module in RSPAMD_OFF:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    process = subprocess.Popen(
        [_program("rspamd"), "-f", "-i", "-c", str(directory / "rspamd.conf"),
         f"--var=LOCAL_CONFDIR={directory}", f"--var=RUNDIR={directory / 'run'}",
         f"--var=DBDIR={directory / 'db'}", f"--var=LOGDIR={directory / 'log'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # The main process binds the worker's socket before it starts the worker: from this
    # line on, a request waits in the socket's queue until the worker takes it.
    service = Service(process, port, b"starting normal process")
    service.wait_ready("rspamd")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=120) as r:
        assert r.read().strip() == b"pong", service.tail()
    return service


def start_clamd(directory: Path, port: int | None = None) -> Service:
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "db"
    database.mkdir(exist_ok=True)
    (database / "test.ndb").write_text(
        "Test.EICAR.NDB:0:*:"
        + binascii.hexlify(b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE").decode() + "\n")
    port = port or free_port()
    (directory / "clamd.conf").write_text(
        "Foreground yes\n"
        f"DatabaseDirectory {database}\n"
        f"TCPSocket {port}\nTCPAddr 127.0.0.1\n"
        f"PidFile {directory / 'clamd.pid'}\n"
        "ScanMail yes\nStreamMaxLength 25M\nMaxThreads 4\nSelfCheck 0\nBytecode no\n")
    process = subprocess.Popen(
        [_program("clamd"), "--foreground", "-c", str(directory / "clamd.conf")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # Its last line before it takes connections (the socket is bound earlier).
    service = Service(process, port, b"Self checking disabled")
    service.wait_ready("clamd")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"zPING\0")
        assert s.recv(16).startswith(b"PONG"), service.tail()
    return service
