"""A remote MX for outbound tests: Postfix's ``smtp-sink`` (Debian package ``postfix``) on a
loopback address of its own, dumping each message it accepts into a directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Sink:
    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def messages(self) -> list[bytes]:
        """Every message received so far, as smtp-sink dumped it (its X- lines and Received
        header first), in CRLF form; a dump still being written is skipped."""
        found = []
        for path in sorted(self.directory.glob("m-*")):
            data = path.read_bytes()
            if data.endswith(b"\n"):
                found.append(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def start_sink(
    directory: Path, host: str = "127.0.0.2", port: int | None = None,
    options: Sequence[str] = (),
) -> Sink:
    """smtp-sink on ``host:port``; ``options`` as for smtp-sink (``-r RCPT`` soft-rejects
    recipients, ``-f RCPT`` hard-rejects them, ``-b``/``-B`` set those replies)."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(binary):
        raise AssertionError("smtp-sink is missing: apt-get install postfix")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.chown(directory, "nobody")
    port = port or free_port(host)
    argv = [binary, "-u", "nobody", "-h", "sink.test", "-d", f"{directory}/m-", *options,
            f"{host}:{port}", "100"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:  # readiness: it accepts connections
        try:
            with socket.create_connection((host, port), timeout=1) as probe:
                probe.recv(100)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                error = process.stderr.read().decode() if process.stderr else ""
                raise AssertionError(f"smtp-sink did not start: {error}") from None
            time.sleep(0.02)
    return Sink(host, port, directory, process)
