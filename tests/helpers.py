"""Running ESP's programs as an operator would: the `esp` CLI and `twistd`, as subprocesses."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

    def wait_for(self, text: str, timeout: float = 60, count: int = 1) -> str:
        """Read the log until ``count`` lines contain ``text`` (returns the last); fail if the
        process exits first."""
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        try:
            while True:
                matching = [line for line in self.lines if text in line]
                if len(matching) >= count:
                    return matching[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {text!r} in the log:\n" + self.log)
                if selector.select(remaining):
                    # Raw reads: a buffered readline() could hold lines select() cannot see.
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        self.process.wait(timeout=30)
                        raise AssertionError(
                            f"twistd exited ({self.process.returncode}) before {text!r}:\n"
                            + self.log
                        )
                    self._partial += chunk
                    *complete, self._partial = self._partial.split(b"\n")
                    self.lines.extend(line.decode("utf-8", "replace") + "\n" for line in complete)
        finally:
            selector.close()

    def drain(self) -> None:
        """Read what the log has so far without waiting (a busy server must not block on a
        full pipe while a test waits for something else)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.select(0):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self._partial += chunk
                *complete, self._partial = self._partial.split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") + "\n" for line in complete)
        finally:
            selector.close()

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


async def until(condition: Callable[[], bool], limit: float = 60) -> None:
    """Let the reactor run until ``condition`` holds (waiting for a state, not a duration)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + limit
    while not condition():
        assert reactor.seconds() < deadline, "the condition never held"
        await deferLater(reactor, 0.01)
