"""A worker process's log, carried to its parent.

A worker (:mod:`esp.worker`) formats each log event once and writes it on its standard output
as a small JSON record (RS, the record, LF): its time, level, namespace, system and text, a
failure's traceback included.  The parent (:class:`esp.workers.WorkerProcess`) publishes each
into its own log as an event of that level, time and namespace, with the worker's number first
in its system (``[worker 1: esp.smtp.server#info] accepted ...``): a worker's error is an error
in the parent's log, and an event of several lines stays one event.  (Before, the parent
logged each line of the worker's text log again, at info level, one event per line.)

Anything else on those pipes (a crash before the log began, a stray print) is logged a line at
a time as text.
"""

from __future__ import annotations

import json
import math
from typing import IO, cast

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import provider

_RECORD = "\x1e"
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def parent_log_observer(out: IO[str]) -> ILogObserver:
    """The worker's observer: each event as one record on ``out``."""

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text += "\n" + failure.getTraceback().rstrip("\n")
            except Exception:
                text += "\n" + repr(failure)
        level = event.get("log_level")
        record = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "system": event.get("log_system"),
            "text": text,
        }
        # default=str: a legacy event's system (or any field) need not be a string.
        out.write(_RECORD + json.dumps(record, separators=(",", ":"), default=str) + "\n")
        out.flush()

    return cast(ILogObserver, observe)


class WorkerLog:
    """The parent's end: bytes from one of a worker's pipes, published as events."""

    def __init__(self, index: int, level: LogLevel = LogLevel.info,
                 publish: ILogObserver = globalLogPublisher) -> None:
        self._index = index
        self._level = level  # of plain-text lines
        self._publish = publish
        self._plain = Logger(namespace="esp.workers", observer=publish)
        self._buffer = bytearray()

    def received(self, data: bytes) -> None:
        # Only the new bytes are searched for line ends: one long event arriving in many
        # reads costs its length, not its length times the number of reads.
        searched = len(self._buffer)
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", searched)) >= 0:
            self._line(bytes(self._buffer[start:end]))
            start = searched = end + 1
        del self._buffer[:start]

    def flush(self) -> None:
        """Log what is left of an unfinished line (the worker has exited)."""
        if self._buffer:
            line, self._buffer = bytes(self._buffer), bytearray()
            self._line(line)

    def _line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        event = self._event(text) if text.startswith(_RECORD) else None
        if event is None:
            self._plain.emit(self._level, "worker {index}: {line}", index=self._index,
                             line=text)
        else:
            self._publish(event)

    def _event(self, text: str) -> LogEvent | None:
        """The event of a record; None if it is not one (it is then logged as text)."""
        try:
            record = json.loads(text[len(_RECORD):])
            level = _LEVELS[record["level"]]
            namespace = str(record["namespace"])
            system = record["system"] or f"{namespace}#{level.name}"
            when = float(record["time"])
            if not math.isfinite(when):
                return None
            return {
                "log_time": when,
                "log_level": level,
                "log_namespace": namespace,
                "log_system": f"worker {self._index}: {system}",
                "log_format": "{log_text}",
                "log_text": str(record["text"]),
                "esp_worker": self._index,
            }
        except Exception:  # whatever the line holds, it must not stop the worker's log
            return None
