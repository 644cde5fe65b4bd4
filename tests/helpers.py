"""Running ESP's programs as an operator would: the `esp` CLI and `twistd`, as subprocesses."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from esp.events import Event
from esp.eventschemas import event_body, schema_of

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def program(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise AssertionError(
            f"{path} is missing: install ESP first "
            "(pip install --config-settings editable_mode=compat -e '.[test]')"
        )
    return str(path)


def run_esp(
    *args: str, config: Path | None = None, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [program("esp")]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(
        [*argv, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Server:
    """A `twistd -n` process whose log we read line by line."""

    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    _partial: bytes = b""
    # The log reached its end (the process closed its output: it is exiting).
    ended: bool = False

    def wait_for(self, text: str, timeout: float = 60, count: int = 1) -> str:
        """Read the log until ``count`` lines contain ``text`` (returns the last); fail if the
        process exits first."""

        def matching() -> list[str]:
            return [line for line in self.lines if text in line]

        wait_for_logs([self], lambda: len(matching()) >= count, f"{text!r} in the log",
                      timeout)
        return matching()[count - 1]

    def read_available(self) -> bool:
        """Read one chunk of the log (the caller saw it readable); False at its end."""
        assert self.process.stdout is not None
        # Raw reads: a buffered readline() could hold lines select() cannot see.
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            self.ended = True
            return False
        self._partial += chunk
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(line.decode("utf-8", "replace") + "\n" for line in complete)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        rest = (self._partial + out).decode("utf-8", "replace")
        self._partial = b""
        self.lines.extend(rest.splitlines(keepends=True))
        return self.process.returncode

    @property
    def log(self) -> str:
        return "".join(self.lines)


def start_twistd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Server:
    process = subprocess.Popen(
        [program("twistd"), "-n", "--pidfile=", "--logfile=-", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
    )
    return Server(process)


def wait_for_logs(
    servers: Sequence[Server], condition: Callable[[], bool], what: str,
    timeout: float = 60,
) -> None:
    """Check ``condition`` now and again each time one of ``servers`` writes to its log, until
    it holds.  ESP logs after every change a test waits for (an accepted message, a delivery
    attempt, spool files removed), so this waits for events, not for time; and reading the
    logs keeps a busy server from blocking on a full pipe.  Fails after ``timeout`` seconds,
    or when every server has exited first."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    for server in servers:
        assert server.process.stdout is not None
        if not server.process.stdout.closed:  # not yet read to its end by stop()
            selector.register(server.process.stdout.fileno(), selectors.EVENT_READ, server)
    try:
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.get_map():
                logs = "\n".join(f"(exit status {server.process.poll()})\n{server.log[-5000:]}"
                                 for server in servers)
                raise AssertionError(f"{what} never happened; the logs end:\n{logs}")
            for key, _ in selector.select(remaining):
                if not key.data.read_available():
                    selector.unregister(key.fileobj)
    finally:
        selector.close()


async def until(condition: Callable[[], bool], limit: float = 60) -> None:
    """Let the reactor run until ``condition`` holds (waiting for a state, not a duration)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + limit
    while not condition():
        assert reactor.seconds() < deadline, "the condition never held"
        await deferLater(reactor, 0.01)


def assert_matches_schema(body: dict[str, Any]) -> None:
    """``body`` (a webhook body, or an event as :func:`event_body` makes it) is valid under
    its type's published schema, and carries no field that schema does not describe."""
    schema = schema_of(body["type"])
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)
    unknown = set(body["data"]) - set(schema["properties"]["data"]["properties"])
    assert not unknown, f"{body['type']} carries fields its schema lacks: {sorted(unknown)}"


def assert_event_matches_schema(event: Event) -> None:
    assert_matches_schema(json.loads(json.dumps(event_body(event), default=str)))


def _starting_up_server() -> tuple[socket.socket, threading.Thread]:
    """A TCP server that answers each connection as a PostgreSQL that is starting up does
    (SQLSTATE 57P03): libpq then tries the next host of the DSN, on a new socket."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    fields = b"".join(code + text + b"\0" for code, text in (
        (b"S", b"FATAL"), (b"V", b"FATAL"), (b"C", b"57P03"),
        (b"M", b"the database system is starting up")))
    error = b"E" + struct.pack(">I", 4 + len(fields) + 1) + fields + b"\0"

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            with connection:
                (length,) = struct.unpack(">I", connection.recv(4))
                connection.recv(length - 4)  # the startup packet
                connection.sendall(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def starting_up_first(dsn: str) -> tuple[socket.socket, threading.Thread, str]:
    """``dsn`` (an embedded cluster's) with a first host that is starting up: libpq connects
    there, is turned away, and goes on to the real one on another socket.  The caller shuts
    the server down (``shutdown`` wakes its ``accept``) and joins the thread."""
    server, thread = _starting_up_server()
    port = server.getsockname()[1]
    settings = dict(item.split("=", 1) for item in dsn.split())
    return server, thread, (
        f"host=127.0.0.1,{settings['host']} port={port},{settings['port']} "
        f"dbname={settings['dbname']} user={settings['user']} sslmode=disable "
        "gssencmode=disable")
