"""Maildir writes (and the index rows that record them) in a helper process, so that fsync
never waits for the GIL and a delivery costs the reactor one round trip.

A delivery makes five system calls per file (open, write, fsync, close, rename) plus a
directory fsync.  In a thread of the reactor's process each of them gives up the GIL and must
win it back from a busy reactor: under load that wait, not the disk, set the pace (a batch of
four files took 10 ms, of which 2 ms was work).  The helper is a child process of its own
(``python -m esp.storage.diskwriter``) that owns no sockets: it reads batches on stdin, writes
them with :func:`esp.storage.maildir.deliver_many` (the jobs of a batch in parallel, their
fsyncs overlapping) and, for a ``deliver`` request, records the durable files in PostgreSQL
with :class:`esp.storage.recorder.Recorder` (one statement and one commit for the batch) before
it answers on stdout.  The reactor side is a plain ProcessProtocol: no thread at all.

Wire format, both ways: a 4-byte big-endian length, then a :mod:`marshal` payload (only bytes,
strings, integers and tuples; both ends are this module).
"""

from __future__ import annotations

import marshal
import os
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from esp.prompt import write_to_child
from esp.storage.maildir import (
    Job,
    MaildirError,
    Staged,
    StoredFile,
    deliver_many,
    publish_many,
    remove_files,
    stage,
)
from esp.storage.recorder import GroupRecorder, Outcome, Recorder

# The helper's database, for ``deliver`` requests (an environment variable, not an argument:
# command lines are world-readable).
DSN_VARIABLE = "ESP_DELIVERY_DSN"
# One delivery for the helper: the message, its mailboxes and, for each, the record of the row
# (mailstore.record_fields) that the file's name and size complete.
Delivery = tuple[bytes, Sequence[tuple[str, str]], Sequence[Mapping[str, object]]]

_LENGTH = struct.Struct(">I")
# Jobs written at once in the helper, and batches in progress at once.
PARALLEL_JOBS = 8
# Batches in progress at once: each writes and fsyncs its files while the recorder's thread
# records every batch waiting in one transaction (recorder.GroupRecorder).  Two are enough for
# that overlap (one batch's files are synced while the one before commits).  Eight split the
# same messages into batches of 1.1, each paying its own directory fsync and thread wake-ups
# (~7 % fewer messages/s than two, which give batches of 2.8).  One makes the largest batches
# and the least CPU per message (0.1-0.7 ms less), but in ten alternating pairs of
# bench/smtp_accept.py runs it was slower in six: without the overlap, each batch waits for
# the one before to commit.
BATCHES_AT_ONCE = 2
# A helper that dies within this many seconds of its start, several times in a row, is in a
# crash loop: it is started again at most this often (doubling up to 32 times that).
RESTART_INTERVAL = 1.0
QUICK_DEATHS = 3


def _frame(payload: Any) -> bytes:
    data = marshal.dumps(payload)
    return _LENGTH.pack(len(data)) + data


class _Frames:
    """Reassembles frames from a byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            # Our own child, over its own pipe (see the module docstring).
            frames.append(marshal.loads(bytes(self._buffer[_LENGTH.size:end])))  # noqa: S302
            del self._buffer[:end]
        return frames


# -- the helper process ----------------------------------------------------------------------


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer batches until the parent closes our stdin; up to BATCHES_AT_ONCE at a time."""
    lock = threading.Lock()
    dsn = os.environ.get(DSN_VARIABLE)
    recorder = GroupRecorder(Recorder(dsn)) if dsn else None

    def write(root: str, jobs: Sequence[Job]) -> tuple[Any, ...]:
        results = deliver_many(Path(root), jobs, files if len(jobs) > 1 else None)
        return tuple(
            (True, tuple((f.name, str(f.path), f.size) for f in result))
            if isinstance(result, list) else (False, str(result))
            for result in results
        )

    def deliver(root: str, jobs: Sequence[Delivery]) -> tuple[Outcome, ...]:
        # The files go to tmp/ first (their names and sizes are then known) and the rows to the
        # recorder, which runs their statement while the files are fsync'd here and commits
        # once they are durable: rows never become visible before their files.
        answers: list[Outcome] = [("failed", "")] * len(jobs)
        staged: list[tuple[int, Staged]] = []
        for i, (message, boxes, _) in enumerate(jobs):
            try:
                staged.append((i, stage(Path(root), message, boxes)))
            except MaildirError as e:
                answers[i] = ("failed", str(e))
        if not staged:
            return tuple(answers)
        batch = [[{**record, "filename": item.name, "size": item.size} for record in jobs[i][2]]
                 for i, item in staged]
        durable: Future[list[str | None]] = Future()
        recorded = (recorder.submit(batch, durable) if recorder is not None else None)
        try:
            published = publish_many([item for _, item in staged], files)
        except BaseException:
            durable.set_result(["not written"] * len(staged))
            raise
        durable.set_result([None if isinstance(p, list) else str(p) for p in published])
        outcomes: list[Outcome] = (
            recorded.result() if recorded is not None
            else [("failed", "the writer has no database")] * len(staged)
        )
        for (i, _), files_, outcome in zip(staged, published, outcomes, strict=True):
            if outcome[0] == "stored" and isinstance(files_, list):
                answers[i] = ("stored", tuple(
                    (*ids, f.name, str(f.path), f.size)
                    for ids, f in zip(outcome[1], files_, strict=True)
                ))
                continue
            if outcome[0] != "unknown" and isinstance(files_, list):
                # Not recorded means not delivered: take the files back, so that the client's
                # retry cannot make a duplicate.  (Unknown: a file without its row can be
                # re-indexed; a row without its file would be a lost message.)
                remove_files([f.path for f in files_])
            answers[i] = outcome
        return tuple(answers)

    def answer(batch_id: int, operation: str, *arguments: Any) -> None:
        try:
            answers = write(*arguments) if operation == "write" else deliver(*arguments)
        except Exception as e:  # a bug: fail the batch, keep serving
            failed = (False if operation == "write" else "failed", f"internal error: {e!r}")
            answers = (failed,) * len(arguments[1])
        reply = _frame((batch_id, answers))
        with lock:
            replies.write(reply)
            replies.flush()

    with ThreadPoolExecutor(PARALLEL_JOBS, thread_name_prefix="maildir") as files, \
            ThreadPoolExecutor(BATCHES_AT_ONCE, thread_name_prefix="batch") as batches:
        while True:
            header = _read_exactly(requests, _LENGTH.size)
            if header is None:
                break
            body = _read_exactly(requests, _LENGTH.unpack(header)[0])
            if body is None:
                break
            batches.submit(answer, *marshal.loads(body))  # noqa: S302 (our parent, our pipe)
    if recorder is not None:
        recorder.close()


def main() -> None:
    # Blocked signals and the parent's own handlers are not ours: SIGINT from a terminal must
    # not kill a write half-way; the parent closes stdin to stop us.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)


# -- the reactor side ------------------------------------------------------------------------


class DiskWriter(ProcessProtocol):
    """Starts the helper on first use (and again if it dies) and hands it batches."""

    log = Logger()

    def __init__(self, reactor: Any, root: Path, dsn: str | None = None) -> None:
        self._reactor = reactor
        self._root = str(root)
        self._dsn = dsn
        self._frames = _Frames()
        self._pending: dict[int, Deferred[Sequence[Any]]] = {}
        self._next_id = 0
        self._running = False
        self._stopping = False
        self._last_start = float("-inf")
        self._quick_deaths = 0
        self._ended: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        if self._running:
            return
        self._last_start = self._reactor.seconds()
        self._frames = _Frames()
        self._reactor.spawnProcess(
            self, sys.executable, [sys.executable, "-m", "esp.storage.diskwriter"],
            env={**os.environ, **({DSN_VARIABLE: self._dsn} if self._dsn else {})},
            childFDs={0: "w", 1: "r", 2: 2},
        )
        self._running = True

    async def write(self, jobs: Sequence[Job]) -> list[list[StoredFile] | MaildirError]:
        """Write ``jobs`` durably; one result per job."""
        answers = await self._request("write", self._root, tuple(jobs))
        return [
            [StoredFile(name, Path(path), size) for name, path, size in value]
            if ok else MaildirError(value)
            for ok, value in answers
        ]

    async def deliver(self, jobs: Sequence[Delivery]) -> list[Outcome]:
        """Write ``jobs`` durably and record them in the index (one commit); one outcome per
        job (:mod:`esp.storage.recorder`), stored messages as (mailbox id, UID, MODSEQ, file
        name, path, size)."""
        return list(await self._request("deliver", self._root, tuple(jobs)))

    async def _request(self, *request: Any) -> Sequence[Any]:
        if self._stopping:
            raise MaildirError("the Maildir writer is stopping")
        if not self._running:
            if self._quick_deaths >= QUICK_DEATHS:
                backoff = RESTART_INTERVAL * 2 ** min(self._quick_deaths - QUICK_DEATHS, 5)
                if self._reactor.seconds() - self._last_start < backoff:
                    raise MaildirError("the Maildir writer keeps failing; it will be restarted")
            self.log.info("starting the Maildir writer again")
            self.start()
        assert self.transport is not None
        batch_id = self._next_id
        self._next_id += 1
        waiter: Deferred[Sequence[Any]] = Deferred()
        self._pending[batch_id] = waiter
        write_to_child(self.transport, _frame((batch_id, *request)))
        return await waiter

    def stop(self) -> Deferred[None]:
        """Let the helper finish what it has and exit."""
        self._stopping = True
        if not self._running or self.transport is None:
            return succeed(None)
        ended: Deferred[None] = Deferred()
        self._ended.append(ended)
        self.transport.closeStdin()
        return ended

    # -- ProcessProtocol ----------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        for batch_id, answers in self._frames.feed(data):
            waiter = self._pending.pop(batch_id, None)
            if waiter is not None:
                waiter.callback(answers)

    def processEnded(self, reason: Failure) -> None:
        self._running = False
        if self._reactor.seconds() - self._last_start < RESTART_INTERVAL:
            self._quick_deaths += 1
        else:
            self._quick_deaths = 0
        if not self._stopping or not reason.check(ProcessDone):
            self.log.error("the Maildir writer exited: {reason}", reason=reason.getErrorMessage())
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            # Whether those files were written is unknown; none was acknowledged, and a file
            # without its row is only an orphan for re-indexing.
            waiter.errback(MaildirError("the Maildir writer exited"))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)


if __name__ == "__main__":
    main()
