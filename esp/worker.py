"""Entry point of a worker process (started by :class:`esp.workers.WorkerPool`, not by hand)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


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

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = Config.model_validate(json.loads(os.environ["ESP_WORKER_CONFIG"]))
    service = makeService(config, reactor, exit_on_start_failure=True, adopted=adopted,
                          writer=args.writer)
    service.privilegedStartService()
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
