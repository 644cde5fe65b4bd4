"""Per-message log lines (an accepted message, a delivery attempt) written as one log event for
all those of a tenth of a second.

Twisted's logger formats each event and the file observer writes it on its own: about a
quarter of a millisecond per event, under load more than the bookkeeping of the message it
describes.  One event per reactor turn still cost 8 % of the SMTP benchmark's reactor time
(a turn carries two or three messages); one per tenth of a second carries dozens.  Each
message still gets its own line, with its queue id; the lines after the first of an event
start with a tab (how Twisted writes a multi-line event), so ``grep`` by queue id finds every
one.  A line is written at most LINGER seconds after its message, and at shutdown.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

LINGER = 0.1


class LineLog:
    def __init__(self, log: Logger, reactor: Any = None) -> None:
        self._log = log
        self._reactor = reactor
        self._lines: list[str] = []
        self._hooked = False

    def line(self, text: str) -> None:
        """Log ``text`` (one line) at info level within LINGER seconds."""
        if not self._lines:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = self._reactor = default_reactor
            if not self._hooked and hasattr(reactor, "addSystemEventTrigger"):
                # A reactor stopping runs no more delayed calls: write what is left.
                reactor.addSystemEventTrigger("after", "shutdown", self.flush)
                self._hooked = True
            reactor.callLater(LINGER, self.flush)
        self._lines.append(text)

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            self._log.info("{lines}", lines="\n".join(lines))
