"""Maildir writes (and the index rows that record them) in a helper process, so that fsync
never waits for the GIL and a delivery costs the reactor one round trip.

A delivery makes five system calls per file (open, write, fsync, close, rename) plus a
directory fsync.  In a thread of the reactor's process each of them gives up the GIL and must
win it back from a busy reactor: under load that wait, not the disk, set the pace (a batch of
four files took 10 ms, of which 2 ms was work).  The helper is a child process of its own
(``python -m esp.storage.diskwriter``) that owns no sockets: it reads requests on stdin, and
answers each on stdout once its files are durable and, for a ``deliver`` request, recorded in
PostgreSQL.  ``deliver`` requests, from every client, are delivered by the helper's main
thread, the one that reads them (:class:`_Deliveries`): between two groups it reads whatever
has arrived, without waiting, and makes it the next group: their files staged, renamed and
synced together (:mod:`esp.storage.maildir`), their rows recorded with one statement and one
commit (:class:`esp.storage.recorder.Recorder`: the statement is sent before the fsyncs and
runs meanwhile).  While a group is under way, requests wait in the pipe and the sockets, and
nothing is woken for them: a reading thread of its own was woken for each request, and took
a core from the group's thread each time (one wake-up per message, on a machine whose every
core is busy).  The reactor side sends each delivery as soon as its message is complete
(:data:`REQUESTS_AT_ONCE`) and is a plain ProcessProtocol: no thread at all.

One helper serves the whole node: with worker processes, the main process's helper also
accepts connections on a Unix socket in a private directory, and each worker sends its
batches there (:class:`SharedDiskWriter`).  Every process's deliveries then share one
recorder, so one transaction per group commit; a helper per process made their transactions
queue on the same mailbox rows, each holding them while its files were fsync'd.

Wire format, both ways: a 4-byte big-endian length, then a :mod:`marshal` payload (only bytes,
strings, integers and tuples; both ends are this module).
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import selectors
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from esp.children import child_environment, python_command
from esp.prompt import send_promptly, write_to_child
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
from esp.storage.recorder import Outcome, Recorder

# The helper's database, for ``deliver`` requests (an environment variable, not an argument:
# command lines are world-readable).
DSN_VARIABLE = "ESP_DELIVERY_DSN"
# One delivery for the helper: the message, its mailboxes and, for each, the record of the row
# (mailstore.record_fields) that the file's name and size complete.
Delivery = tuple[bytes, Sequence[tuple[str, str]], Sequence[Mapping[str, object]]]

_LENGTH = struct.Struct(">I")
# Files written at once for a ``write`` request (the outbound spool's).
PARALLEL_JOBS = 8
# Requests a client may have at the helper at once.  Deliveries are grouped there, not in the
# client: the helper takes every delivery waiting when it is free, so a message sent the
# moment it is complete joins the next group, whichever process it came from.  Grouping in
# each client instead (two batches in flight per process, the next one formed while they
# were written) made messages wait for a free slot (~1.1 ms of a 7.5 ms cycle on the
# benchmark), split the load into smaller groups with two worker processes, and let one
# batch's files be synced while another committed, two flushes queueing on one disk: the
# same load took 22-30 % more CPU per message (bench/RESULTS.md, session 11).
REQUESTS_AT_ONCE = 32
# Deliveries per group at most (as many as a client puts in one request: see
# delivery.BATCH_LIMIT).
GROUP_LIMIT = 32
# Bytes read from one client between two groups at most, and the size asked of the parent's
# pipe (Linux's default is 64 KiB, its limit for unprivileged processes 1 MiB).  A large
# message arrives over several turns and does not hold back the groups of the others; from a
# worker, a turn finds at most what its socket buffers (~200 KiB by default).
READ_AT_ONCE = 1 << 20
# Seconds an answer to a worker may wait for room in its socket: a worker that stops reading
# loses its connection (its senders retry) instead of stopping the helper for every process.
ANSWER_TIMEOUT = 30.0
# Threads for ``write`` requests in the helper (made only when needed).
BATCH_THREADS = 64
# The shared helper's listening socket: its descriptor in the helper, its name in the
# private directory.
LISTEN_FD = 3
SOCKET_NAME = "writer.sock"
DIRECTORY_PREFIX = "esp-writer-"
# A socket directory untouched for this many seconds whose socket nobody listens on was left
# by a main process that was killed (a younger one may be another instance starting).
ABANDONED_AFTER = 60.0
MAX_SOCKET_PATH = 100
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


class _Channel:
    """One client of the helper: the parent on stdin/stdout, or a worker process on a
    connection to the shared socket.  Answers come from the main thread and the batch
    threads, whole frames under a lock.

    ``receive(n)`` reads without waiting: up to ``n`` bytes, ``b""`` at the end of the
    stream, BlockingIOError when nothing is there."""

    def __init__(self, read_fd: int, send: Callable[[bytes], None],
                 close: Callable[[], None] = lambda: None,
                 receive: Callable[[int], bytes] | None = None,
                 abort: Callable[[], None] = lambda: None) -> None:
        self.read_fd = read_fd
        self.frames = _Frames()
        self._send = send
        self._close = close
        self._receive = receive or (lambda n: os.read(read_fd, n))
        self._abort = abort
        self._closed = False  # the descriptor is released (by the main thread only)
        self._broken = False  # an answer failed: nothing more goes out
        self._lock = threading.Lock()

    def read(self) -> tuple[list[Any], bool]:
        """The requests complete in what is there now (at most READ_AT_ONCE bytes of it),
        and whether the stream has ended."""
        chunks: list[bytes] = []
        total = 0
        ended = False
        while total < READ_AT_ONCE:
            try:
                data = self._receive(READ_AT_ONCE - total)
            except BlockingIOError:
                break
            except OSError:
                ended = True
                break
            if not data:
                ended = True
                break
            chunks.append(data)
            total += len(data)
        if not chunks:
            return [], ended
        try:
            return self.frames.feed(b"".join(chunks)), ended
        except (ValueError, EOFError, TypeError) as e:  # not our framing: a bug somewhere
            _complain(f"a client sent what is not a request ({e}); its connection ends")
            return [], True

    def answer(self, data: bytes) -> None:
        with self._lock:
            if self._closed or self._broken:
                return  # that client is gone; its requests died with it
            try:
                self._send(data)
            except OSError:
                # Part of a frame may have gone: nothing more can be understood on this
                # connection.  It is shut down, not closed (this may be a batch thread, and
                # the selector still watches the descriptor): the main thread sees it end,
                # then forgets and closes it.  Its requests fail on the client's side, whose
                # senders retry.
                self._broken = True
                with contextlib.suppress(OSError):
                    self._abort()

    @property
    def closed(self) -> bool:
        """Whether this client is gone (or can no longer be answered)."""
        return self._closed or self._broken

    def close(self) -> None:
        # Under the lock: a batch thread must not send on a descriptor number that a new
        # connection may have been given meanwhile.
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()


# A ``deliver`` request: the client it came from, its id, the Maildir root, its deliveries.
_Request = tuple["_Channel", int, str, Sequence[Delivery]]


class _Deliveries:
    """The ``deliver`` requests of every client, delivered in groups by the thread that reads
    them: all those waiting become one group (their files staged and synced together, their
    rows recorded in one transaction), then each request is answered on its own channel.

    One group at a time, as large as what arrived meanwhile: each group pays one series of
    journal commit, directory fsync and database commit, and the next group's files are not
    synced while the database commits (on one disk the two flushes only queue behind each
    other).  With a client's next request already waiting, no round trip is lost between
    groups."""

    def __init__(self, deliver: Callable[[str, Sequence[Delivery]], Sequence[Outcome]],
                 limit: int = GROUP_LIMIT) -> None:
        self._deliver = deliver
        self._limit = limit
        self._waiting: deque[_Request] = deque()

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def submit(self, channel: _Channel, batch_id: int, root: str,
               jobs: Sequence[Delivery]) -> None:
        self._waiting.append((channel, batch_id, root, jobs))

    def deliver_next(self) -> None:
        """Deliver the next group: the requests waiting, in order, as many as fit the limit
        (at least one)."""
        taken = [self._waiting.popleft()]
        count = len(taken[0][3])
        while self._waiting and count + len(self._waiting[0][3]) <= self._limit:
            count += len(self._waiting[0][3])
            taken.append(self._waiting.popleft())
        # Those of a client gone meanwhile go too (below): checked as late as possible.
        roots: dict[str, list[_Request]] = {}
        for request in taken:
            # A client gone meanwhile has failed these already (its senders retry):
            # delivering them now would make duplicates.
            if not request[0].closed:
                roots.setdefault(request[2], []).append(request)
        for root, requests in roots.items():
            try:
                self._group(root, requests)
            except Exception:  # a bug: the helper must live on, or nothing is answered
                for channel, batch_id, _, mine in requests:
                    with contextlib.suppress(Exception):
                        channel.answer(_failed(batch_id, mine, "internal error"))

    def _group(self, root: str, requests: Sequence[_Request]) -> None:
        jobs = [job for _, _, _, mine in requests for job in mine]
        try:
            answers = self._deliver(root, jobs)
        except Exception as e:  # a bug: fail these, keep serving
            answers = [("failed", f"internal error: {e!r}")] * len(jobs)
        # One write per client for all its answers of the group.
        frames: dict[_Channel, list[bytes]] = {}
        position = 0
        for channel, batch_id, _, mine in requests:
            frames.setdefault(channel, []).append(_frame(
                (batch_id, tuple(answers[position:position + len(mine)]))))
            position += len(mine)
        for channel, theirs in frames.items():
            channel.answer(b"".join(theirs))


def _receiver(connection: socket.socket) -> Callable[[int], bytes]:
    """Reads from ``connection`` without waiting (a socket with a timeout is non-blocking
    underneath; its ``sendall`` waits up to the timeout)."""
    return lambda n: os.read(connection.fileno(), n)


def _shutdown(connection: socket.socket) -> Callable[[], None]:
    """Ends ``connection`` both ways, keeping its descriptor (see :meth:`_Channel.answer`)."""
    return lambda: connection.shutdown(socket.SHUT_RDWR)


def _complain(text: str) -> None:
    """A line on standard error, which the parent logs."""
    with contextlib.suppress(Exception):
        print(f"esp.storage.diskwriter: {text}", file=sys.stderr, flush=True)


def _well_formed(request: Any) -> bool:
    """Whether ``request`` is a tuple that starts with its id and operation and, for a
    ``deliver``, has a root and a tuple of deliveries (what the grouping reads)."""
    if not (isinstance(request, tuple) and len(request) >= 2 and isinstance(request[0], int)
            and isinstance(request[1], str)):
        return False
    if request[1] == "deliver":
        return len(request) == 4 and isinstance(request[2], str) and isinstance(
            request[3], tuple) and all(_well_formed_delivery(job) for job in request[3])
    return True


def _well_formed_delivery(job: Any) -> bool:
    """A message, its mailboxes and a record for each (:data:`Delivery`)."""
    return (isinstance(job, tuple) and len(job) == 3 and isinstance(job[0], bytes)
            and isinstance(job[1], tuple) and isinstance(job[2], tuple)
            and len(job[1]) == len(job[2]))


def _failed(batch_id: int, jobs: Sequence[Delivery], why: str) -> bytes:
    """The answer to a ``deliver`` request whose every delivery failed for ``why``."""
    return _frame((batch_id, tuple(("failed", why) for _ in jobs)))


def _write_failed(batch_id: int, jobs: Any, why: str) -> bytes:
    """The answer to a ``write`` request whose every job failed for ``why`` (none if its
    jobs are not even a tuple)."""
    return _frame((batch_id, ((False, why),) * (len(jobs) if isinstance(jobs, tuple) else 0)))


def _stdout_sender(replies: BinaryIO) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        replies.write(data)
        replies.flush()

    return send


def serve(requests: BinaryIO, replies: BinaryIO, listening: socket.socket | None = None) -> None:
    """Answer requests until the parent closes our stdin.  With ``listening``, worker
    processes connect to it and are served too (one thread delivering and one recorder, so one
    group commit, for every process of the node)."""
    dsn = os.environ.get(DSN_VARIABLE)
    recorder = Recorder(dsn) if dsn else None

    def write(root: str, jobs: Sequence[Job]) -> tuple[Any, ...]:
        results = deliver_many(Path(root), jobs, files if len(jobs) > 1 else None)
        return tuple(
            (True, tuple((f.name, str(f.path), f.size) for f in result))
            if isinstance(result, list) else (False, str(result))
            for result in results
        )

    def deliver(root: str, jobs: Sequence[Delivery]) -> tuple[Outcome, ...]:
        # The files go to tmp/ first (their names and sizes are then known), then the rows'
        # statement is sent: it runs in PostgreSQL while the files are renamed and fsync'd
        # here, and is committed once they are durable: rows never become visible before
        # their files.
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
        if recorder is not None:
            recorder.begin(batch)
        try:
            published = publish_many([item for _, item in staged])
        except BaseException:
            if recorder is not None:
                recorder.finish(batch, ["not written"] * len(staged))
            raise
        outcomes: list[Outcome] = (
            recorder.finish(batch, [None if isinstance(p, list) else str(p) for p in published])
            if recorder is not None
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

    def answer(channel: _Channel, batch_id: int, operation: str, *arguments: Any) -> None:
        # A ``write`` request, in a batch thread (``deliver`` ones are grouped).
        try:
            if operation != "write":
                raise ValueError(f"unknown request {operation!r}")
            answers = write(*arguments)
        except Exception as e:  # a bug: fail the batch, keep serving
            channel.answer(_write_failed(batch_id, arguments[1] if len(arguments) > 1 else (),
                                         f"internal error: {e!r}"))
            return
        channel.answer(_frame((batch_id, answers)))

    def dispatch(channel: _Channel, request: Any, stopping: bool) -> None:
        if not _well_formed(request):
            _complain(f"a request that is not one: {request!r:.100}")
            if isinstance(request, tuple) and request and isinstance(request[0], int):
                channel.answer(_frame((request[0], ())))  # the client fails it
        elif stopping:
            # Read only to see which clients go away; the helper takes no new work.
            why = "the writer is stopping"
            channel.answer(_failed(request[0], request[3], why) if request[1] == "deliver"
                           else _write_failed(request[0], request[3] if len(request) > 3
                                              else (), why))
        elif request[1] == "deliver":
            deliveries.submit(channel, request[0], request[2], request[3])
        else:
            batches.submit(answer, channel, *request)

    deliveries = _Deliveries(deliver)
    os.set_blocking(requests.fileno(), False)
    with contextlib.suppress(AttributeError, OSError):  # a larger pipe: fewer turns per message
        fcntl.fcntl(requests.fileno(), fcntl.F_SETPIPE_SZ, READ_AT_ONCE)
    parent = _Channel(requests.fileno(), _stdout_sender(replies))
    channels: dict[int, _Channel] = {parent.read_fd: parent}
    with ThreadPoolExecutor(PARALLEL_JOBS, thread_name_prefix="maildir") as files, \
            ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="batch") as batches, \
            selectors.DefaultSelector() as selector:
        # Each key's data: its channel, or None for the listening socket.
        selector.register(parent.read_fd, selectors.EVENT_READ, parent)
        if listening is not None:
            selector.register(listening.fileno(), selectors.EVENT_READ, None)
        # Once the parent has closed our stdin: what was sent is delivered and answered, the
        # workers are still read between groups (one that goes away has its deliveries
        # dropped), and nothing new is taken.
        stopping = False
        while True:
            # Wait only when there is nothing to deliver; otherwise take what has arrived.
            ready = selector.select(0 if deliveries.waiting or stopping else None)
            for key, _ in ready:
                fd = key.fd
                if key.data is None:
                    if listening is None:
                        continue  # closed earlier in this turn (the parent stopped us)
                    try:
                        connection, _ = listening.accept()
                    except OSError:
                        continue
                    connection.settimeout(ANSWER_TIMEOUT)
                    channel = _Channel(connection.fileno(), connection.sendall,
                                       connection.close, _receiver(connection),
                                       _shutdown(connection))
                    channels[connection.fileno()] = channel
                    selector.register(connection.fileno(), selectors.EVENT_READ, channel)
                    continue
                channel = key.data
                received, ended = channel.read()
                for request in received:
                    try:
                        dispatch(channel, request, stopping)
                    except Exception as e:  # a bug: this request is lost, the helper lives on
                        _complain(f"a request could not be taken: {e!r}")
                if not ended:
                    continue
                selector.unregister(fd)
                if channel is parent:
                    stopping = True  # the parent closed our stdin: finish what was sent
                    if listening is not None:
                        selector.unregister(listening.fileno())
                        listening.close()
                        listening = None
                else:
                    channels.pop(fd).close()  # a worker went away (or will reconnect)
            if deliveries.waiting:
                deliveries.deliver_next()
            elif stopping:
                break
    # The batches still in progress have finished (the pools were shut down): their answers
    # went out before the workers' connections close.
    for channel in channels.values():
        channel.close()
    if recorder is not None:
        recorder.close()


def main(argv: Sequence[str] | None = None) -> None:
    # Blocked signals and the parent's own handlers are not ours: SIGINT from a terminal, or
    # the SIGTERM a service manager sends every process of the service at once, must not kill
    # a write half-way or the answers due to the workers; the parent closes stdin to stop us
    # once they are done (and stdin ends too if the parent dies).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = list(sys.argv[1:] if argv is None else argv)
    listening = None
    if args[:1] == ["--listen-fd"]:
        listening = socket.socket(fileno=int(args[1]))
        listening.setblocking(False)
    serve(sys.stdin.buffer, sys.stdout.buffer, listening)


# -- the reactor side ------------------------------------------------------------------------


class _Requests:
    """What both ends of the reactor side share: numbered requests, answered by frames."""

    def __init__(self, root: Path) -> None:
        self._root = str(root)
        self._frames = _Frames()
        self._pending: dict[int, Deferred[Sequence[Any]]] = {}
        self._next_id = 0

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
        await self._ready()
        batch_id = self._next_id
        self._next_id += 1
        waiter: Deferred[Sequence[Any]] = Deferred()
        self._pending[batch_id] = waiter
        self._send(_frame((batch_id, *request)))
        return await waiter

    async def _ready(self) -> None:
        """Make sure there is a helper to send to; raise MaildirError if there cannot be."""
        raise NotImplementedError

    def _send(self, frame: bytes) -> None:
        raise NotImplementedError

    def _received(self, data: bytes) -> None:
        for batch_id, answers in self._frames.feed(data):
            waiter = self._pending.pop(batch_id, None)
            if waiter is not None:
                waiter.callback(answers)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        self._frames = _Frames()
        for waiter in pending.values():
            # Whether those files were written is unknown; none was acknowledged, and a file
            # without its row is only an orphan for re-indexing.
            waiter.errback(MaildirError(why))


def remove_abandoned_directories(parent: Path) -> list[Path]:
    """Remove the socket directories in ``parent`` that a main process killed without its
    stop left behind (one per start otherwise): this user's, whose socket nobody listens on
    any more (a live helper's, of another instance, answers the connection and is kept).
    Returns those removed."""
    removed = []
    for directory in parent.glob(DIRECTORY_PREFIX + "*"):
        try:
            status = directory.lstat()
            if (not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid()
                    or time.time() - status.st_mtime < ABANDONED_AFTER):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(directory / SOCKET_NAME))
                    continue  # someone listens: in use
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            with contextlib.suppress(FileNotFoundError):
                (directory / SOCKET_NAME).unlink()
            directory.rmdir()
            removed.append(directory)
        except OSError:
            continue  # not ours to judge (another file in it, a race with its owner)
    return removed


class DiskWriter(_Requests, ProcessProtocol):
    """Starts the helper on first use (and again if it dies) and hands it batches.

    With ``shared``, the helper also listens on a Unix socket in a private directory
    (:attr:`address`) for this node's worker processes (:class:`SharedDiskWriter`): one
    helper, so one group commit, for every process, instead of one per process whose
    transactions queue on the same mailbox rows."""

    log = Logger()

    def __init__(self, reactor: Any, root: Path, dsn: str | None = None,
                 shared: bool = False) -> None:
        super().__init__(root)
        self._reactor = reactor
        self._dsn = dsn
        self._shared = shared
        self._listening: socket.socket | None = None
        self._directory: str | None = None
        self._running = False
        self._stopping = False
        self._last_start = float("-inf")
        self._quick_deaths = 0
        self._ended: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self._running

    @property
    def address(self) -> str | None:
        """The socket worker processes connect to (once started shared), else None."""
        return os.path.join(self._directory, SOCKET_NAME) if self._directory else None

    def start(self) -> None:
        if self._running:
            return
        if self._shared and self._listening is None:
            self._listen()
        self._last_start = self._reactor.seconds()
        argv = python_command("esp.storage.diskwriter")
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        if self._listening is not None:
            # The socket stays open here: workers queue on it while a helper is replaced.
            child_fds[LISTEN_FD] = self._listening.fileno()
            argv += ["--listen-fd", str(LISTEN_FD)]
        self._reactor.spawnProcess(
            self, sys.executable, argv,
            env=child_environment({DSN_VARIABLE: self._dsn} if self._dsn else None),
            childFDs=child_fds,
        )
        self._running = True

    def _listen(self) -> None:
        # A directory only this user can enter (mkdtemp: mode 0700), on this node (the data
        # directory may be shared between nodes).
        self._directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX)
        if len(os.path.join(self._directory, SOCKET_NAME).encode()) > MAX_SOCKET_PATH:
            # A long $TMPDIR: a Unix socket's name must fit in 108 bytes.
            os.rmdir(self._directory)
            self._directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir="/tmp")
        remove_abandoned_directories(Path(self._directory).parent)
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listening.bind(os.path.join(self._directory, SOCKET_NAME))
            listening.listen(64)
        except OSError:
            listening.close()
            self._remove_directory()
            raise
        self._listening = listening

    def _remove_directory(self) -> None:
        if self._directory is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._directory, SOCKET_NAME))
            with contextlib.suppress(OSError):
                os.rmdir(self._directory)
            self._directory = None

    async def _ready(self) -> None:
        if self._stopping:
            raise MaildirError("the Maildir writer is stopping")
        if not self._running:
            if self._reactor.seconds() - self._last_start < self._backoff():
                raise MaildirError("the Maildir writer keeps failing; it will be restarted")
            self.log.info("starting the Maildir writer again")
            self.start()

    def _send(self, frame: bytes) -> None:
        assert self.transport is not None
        write_to_child(self.transport, frame)

    def stop(self) -> Deferred[None]:
        """Let the helper finish what it has and exit."""
        self._stopping = True
        if self._listening is not None:
            self._listening.close()
            self._listening = None
            self._remove_directory()
        if not self._running or self.transport is None:
            return succeed(None)
        ended: Deferred[None] = Deferred()
        self._ended.append(ended)
        self.transport.closeStdin()
        return ended

    # -- ProcessProtocol ----------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self._received(data)

    def processEnded(self, reason: Failure) -> None:
        self._running = False
        if self._reactor.seconds() - self._last_start < RESTART_INTERVAL:
            self._quick_deaths += 1
        else:
            self._quick_deaths = 0
        if not self._stopping or not reason.check(ProcessDone):
            self.log.error("the Maildir writer exited: {reason}", reason=reason.getErrorMessage())
        self._fail_pending("the Maildir writer exited")
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)
        if self._listening is not None and not self._stopping:
            # Workers wait on the socket for a helper: start the next one now, not at this
            # process's next delivery (which may be a long way off).
            self._reactor.callLater(self._backoff(), self._restart)

    def _backoff(self) -> float:
        """Seconds before the next helper may start (0 unless it keeps dying at once)."""
        if self._quick_deaths < QUICK_DEATHS:
            return 0.0
        return float(RESTART_INTERVAL * 2 ** min(self._quick_deaths - QUICK_DEATHS, 5))

    def _restart(self) -> None:
        if self._running or self._stopping:
            return
        self.log.info("starting the Maildir writer again")
        try:
            self.start()
        except Exception:
            # Workers wait on the socket: never give up on them (fork failing for want of
            # memory or processes is a moment, not a state).
            self.log.failure("cannot start the Maildir writer; trying again")
            self._quick_deaths += 1
            self._reactor.callLater(max(self._backoff(), RESTART_INTERVAL), self._restart)


class _Connection(Protocol):
    def __init__(self, owner: SharedDiskWriter) -> None:
        self._owner = owner

    def dataReceived(self, data: bytes) -> None:
        self._owner._received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._owner._lost(self)


class SharedDiskWriter(_Requests):
    """A worker process's way to the parent's helper (:class:`DiskWriter` with ``shared``):
    the same requests over a Unix socket, connected on first use and again after the
    helper was replaced."""

    log = Logger()

    def __init__(self, reactor: Any, root: Path, address: str) -> None:
        super().__init__(root)
        self._reactor = reactor
        self._address = address
        self._connection: _Connection | None = None
        self._waiting: list[Deferred[None]] = []  # for the connection being made
        self._stopping = False

    def start(self) -> None:
        """Nothing to start: the parent runs the helper; this connects when first used."""

    async def _ready(self) -> None:
        if self._stopping:
            raise MaildirError("the Maildir writer is stopping")
        while self._connection is None:
            waiter: Deferred[None] = Deferred()
            self._waiting.append(waiter)
            if len(self._waiting) == 1:
                Deferred.fromCoroutine(self._connect())
            await waiter

    async def _connect(self) -> None:
        """Connect, then tell every request waiting for it (each its own failure)."""
        error: MaildirError | None = None
        try:
            endpoint = UNIXClientEndpoint(self._reactor, self._address, timeout=10)
            self._connection = await connectProtocol(endpoint, _Connection(self))
        except Exception as e:
            error = MaildirError(f"cannot reach the Maildir writer: {e}")
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(Failure(error))

    def _send(self, frame: bytes) -> None:
        assert self._connection is not None and self._connection.transport is not None
        send_promptly(self._connection.transport, frame, once_per_read=False)

    def _lost(self, connection: _Connection) -> None:
        if connection is self._connection:
            self._connection = None
            self._fail_pending("the Maildir writer went away")

    def stop(self) -> Deferred[None]:
        """Wait for the answers still due, then disconnect."""
        self._stopping = True
        if self._connection is None or self._connection.transport is None:
            return succeed(None)
        waiting = list(self._pending.values())
        connection = self._connection

        def close(_: object) -> None:
            if connection.transport is not None:
                connection.transport.loseConnection()

        return DeferredList(waiting, consumeErrors=True).addBoth(close)


if __name__ == "__main__":
    main()
