"""A worker's log reaches its parent's log event by event (esp.workerlog): level, namespace,
time, the worker's number and a failure's traceback with its message, however the pipe cuts
the bytes."""

from __future__ import annotations

import io
import os

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from zope.interface import provider

from esp.workerlog import WorkerLog, parent_log_observer


def _collector() -> tuple[list[LogEvent], ILogObserver]:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    return events, observe


def _worker_output() -> bytes:
    """What a worker writes on its standard output for three events, through a real pipe."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w", encoding="utf-8") as out:
        log = Logger(namespace="esp.smtp.server", observer=parent_log_observer(out))
        log.info("accepted {id} size={size}", id="abc.1", size=2352)
        log.info("{lines}", lines="first line\nsecond line")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("delivery {id} failed", Failure(), id="abc.2")
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read()


def test_events_keep_their_level_namespace_and_traceback_whatever_the_chunks() -> None:
    output = _worker_output()
    for size in (1, 7, len(output)):
        events, observe = _collector()
        relay = WorkerLog(3, publish=observe)
        for start in range(0, len(output), size):
            relay.received(output[start:start + size])
        assert [e["log_level"] for e in events] == [LogLevel.info, LogLevel.info,
                                                    LogLevel.critical]
        assert all(e["esp_worker"] == 3 for e in events)
        texts = [formatEventAsClassicLogText(e) for e in events]
        assert "[worker 3: esp.smtp.server#info] accepted abc.1 size=2352\n" in texts[0]
        # One event stays one event, its lines together.
        assert texts[1].endswith("[worker 3: esp.smtp.server#info] first line\n\tsecond line\n")
        assert "[worker 3: esp.smtp.server#critical] delivery abc.2 failed" in texts[2]
        assert "ZeroDivisionError: division by zero" in texts[2]  # the message, not only the type
        assert "1 / 0" in texts[2]


def test_plain_text_on_the_pipe_is_logged_a_line_at_a_time() -> None:
    events, observe = _collector()
    relay = WorkerLog(2, LogLevel.warn, publish=observe)
    relay.received(b"Traceback (most recent call last):\n  File \"x\"")
    relay.received(b", line 1\n\x1e{not json}\n")
    texts = [formatEventAsClassicLogText(e) for e in events]
    assert [e["log_level"] for e in events] == [LogLevel.warn] * 3
    assert texts[0].endswith("[esp.workers#warn] worker 2: Traceback (most recent call last):\n")
    assert texts[1].endswith('worker 2:   File "x", line 1\n')
    assert texts[2].endswith("worker 2: \x1e{not json}\n")


def test_a_worker_observer_writes_one_record_per_event() -> None:
    out = io.StringIO()
    Logger(observer=parent_log_observer(out)).info("one\ntwo {x}", x={"braces": "{}"})
    assert out.getvalue().count("\x1e") == 1 and out.getvalue().count("\n") == 1
    events, observe = _collector()
    WorkerLog(1, publish=observe).received(out.getvalue().encode())
    assert formatEventAsClassicLogText(events[0]).endswith(
        "] one\n\ttwo {'braces': '{}'}\n")


def test_broken_records_are_logged_as_text_and_the_log_goes_on() -> None:
    events, observe = _collector()
    relay = WorkerLog(1, publish=observe)
    broken = [
        b'\x1e{"time":1e999999,"level":"info","namespace":"x","system":null,"text":"t"}',
        b'\x1e{"time":1' + b"0" * 400 + b',"level":"info","namespace":"x","system":null}',
        b'\x1e{"time":1.0,"level":"loud","namespace":"x","system":null,"text":"t"}',
        b'\x1e[1, 2]',
        b"\x1e" + b"[" * 100_000 + b"]" * 100_000,
        b"\x1e\xff\xfe",
    ]
    relay.received(b"\n".join(broken) + b"\n")
    out = io.StringIO()
    Logger(observer=parent_log_observer(out)).info("still here")
    relay.received(out.getvalue().encode())
    assert len(events) == 7
    assert [e["log_namespace"] for e in events[:6]] == ["esp.workers"] * 6
    assert events[-1]["log_namespace"] != "esp.workers"  # a record again
    assert formatEventAsClassicLogText(events[-1]).endswith("] still here\n")


def test_a_system_that_is_not_text_still_reaches_the_parent() -> None:
    out = io.StringIO()
    class System:
        def __str__(self) -> str:
            return "legacy-system"

    parent_log_observer(out)({"log_format": "legacy", "log_system": System(),
                              "log_level": LogLevel.info, "log_time": 1.0})
    events, observe = _collector()
    WorkerLog(4, publish=observe).received(out.getvalue().encode())
    assert formatEventAsClassicLogText(events[0]).endswith("[worker 4: legacy-system] legacy\n")


def test_an_unfinished_last_line_is_logged_when_the_worker_ends() -> None:
    events, observe = _collector()
    relay = WorkerLog(5, LogLevel.warn, publish=observe)
    relay.received(b"Fatal Python error: Aborted")
    assert events == []
    relay.flush()
    relay.flush()
    assert [formatEventAsClassicLogText(e).endswith(
        "worker 5: Fatal Python error: Aborted\n") for e in events] == [True]
