"""Entry point of a worker process (started by :class:`esp.workers.WorkerPool`, not by hand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.fdesc import setNonBlocking
from twisted.logger import globalLogBeginner

from esp.workerlog import parent_log_observer


class ParentWatch(FileDescriptor):
    """Stops the worker when its parent is gone.  The parent holds the other end of our
    standard input and never writes to it: it ends (EOF) when the parent exits, however it
    exits.  A worker left behind by a parent that was killed would go on holding the listening
    sockets (a new ESP could not bind them) with nobody to restart it or to hand it deliveries'
    Maildir writer."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self._running_reactor = reactor
        setNonBlocking(0)
        self.startReading()

    def fileno(self) -> int:
        return 0

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._parent_gone()

    def connectionLost(self, reason: Any) -> None:
        # epoll reports the end of a pipe as a hang-up: the reactor calls this, not doRead.
        super().connectionLost(reason)
        self._parent_gone()

    def _parent_gone(self) -> None:
        self.stopReading()
        if self._running_reactor.running:
            self._running_reactor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="esp.worker")
    parser.add_argument("--listener", action="append", default=[],
                        help="NAME=FD:FAMILY of an inherited listening socket")
    parser.add_argument("--writer", help="the parent's shared Maildir writer (a Unix socket)")
    args = parser.parse_args(argv)
    adopted = {}
    for item in args.listener:
        name, _, rest = item.partition("=")
        fd, _, family = rest.partition(":")
        adopted[name] = (int(fd), int(family))

    from twisted.internet import reactor

    from esp.config import Config
    from esp.service import makeService

    # Events go to the parent as JSON records; it logs them with its own (esp.workers).
    globalLogBeginner.beginLoggingTo([parent_log_observer(sys.stdout)], redirectStandardIO=False)
    config = Config.model_validate(json.loads(os.environ["ESP_WORKER_CONFIG"]))
    service = makeService(config, reactor, exit_on_start_failure=True, adopted=adopted,
                          writer=args.writer)
    service.privilegedStartService()
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(ParentWatch, reactor)
    reactor.run()


if __name__ == "__main__":
    main()
