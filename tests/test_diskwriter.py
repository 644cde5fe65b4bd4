"""The Maildir writer process: durable files for batches of jobs, each job on its own; a helper
that dies is replaced, and the deliveries it held fail instead of hanging."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

import esp
from esp.children import child_environment
from esp.storage import diskwriter
from esp.storage.diskwriter import (
    ABANDONED_AFTER,
    DSN_VARIABLE,
    GROUP_LIMIT,
    READ_AT_ONCE,
    Delivery,
    DiskWriter,
    SharedDiskWriter,
    _Channel,
    _Deliveries,
    _frame,
    _Frames,
    remove_abandoned_directories,
    serve,
)
from esp.storage.maildir import MaildirError
from esp.storage.recorder import Outcome
from tests.helpers import until


@pytest_twisted.async_yield_fixture
async def writer(scratch: Path) -> AsyncIterator[DiskWriter]:
    w = DiskWriter(reactor, scratch / "maildir")
    w.start()
    yield w
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_each_job_of_a_batch_is_written_or_refused_on_its_own(
    writer: DiskWriter, scratch: Path
) -> None:
    results = await writer.write([
        (b"one\r\n", (("d/alice", ""),)),
        (b"two\r\n", (("d/alice", "no-dot"),)),  # not a Maildir++ folder name
        (b"three\r\n", (("d/alice", ""), ("d/bob", ".Archive"))),
    ])
    assert isinstance(results[1], MaildirError)
    first, third = results[0], results[2]
    assert isinstance(first, list) and isinstance(third, list)
    assert first[0].path.read_bytes() == b"one\r\n"
    assert first[0].path.parent == scratch / "maildir" / "d" / "alice" / "new"
    assert [f.path.read_bytes() for f in third] == [b"three\r\n", b"three\r\n"]
    assert third[1].path.parent == scratch / "maildir" / "d" / "bob" / ".Archive" / "new"
    assert third[0].size == 7
    assert sorted(os.listdir(scratch / "maildir" / "d" / "alice" / "tmp")) == []


@pytest_twisted.ensureDeferred
async def test_a_helper_that_dies_is_replaced(writer: DiskWriter) -> None:
    assert writer.transport is not None
    first_pid = writer.transport.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    await until(lambda: not writer.running)
    [files] = await writer.write([(b"after\r\n", (("d/carol", ""),))])
    assert isinstance(files, list)
    assert files[0].path.read_bytes() == b"after\r\n"
    assert writer.transport.pid not in (None, first_pid)


@pytest_twisted.ensureDeferred
async def test_a_batch_in_flight_when_the_helper_dies_fails(writer: DiskWriter) -> None:
    assert writer.transport is not None
    pid = writer.transport.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the batch is sent but cannot be answered
    pending = writer.write([(b"lost\r\n", (("d/dave", ""),))])
    waiting = Deferred.fromCoroutine(pending)
    assert not waiting.called
    os.kill(pid, signal.SIGKILL)
    try:
        await waiting
    except MaildirError as e:
        assert "exited" in str(e)
    else:
        raise AssertionError("a batch whose helper died was reported written")


@pytest_twisted.ensureDeferred
async def test_the_helper_runs_this_code_not_an_esp_in_the_current_directory(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -m` puts the current directory first on sys.path: started from a directory that
    # holds another esp/ (a checkout of another version), the helper would run that instead.
    impostor = scratch / "elsewhere" / "esp" / "storage"
    impostor.mkdir(parents=True)
    for package in (impostor.parent, impostor):
        (package / "__init__.py").write_text("")
    (impostor / "diskwriter.py").write_text("raise SystemExit('the wrong esp')\n")
    monkeypatch.chdir(scratch / "elsewhere")
    w = DiskWriter(reactor, scratch / "maildir")
    w.start()
    try:
        [files] = await w.write([(b"mine\r\n", (("d/erin", ""),))])
    finally:
        await w.stop()
    assert isinstance(files, list)
    assert files[0].path.read_bytes() == b"mine\r\n"


def test_children_import_this_esp_whatever_the_current_directory(scratch: Path) -> None:
    impostor = scratch / "elsewhere" / "esp"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("")
    found = subprocess.run(
        [sys.executable, "-P", "-c", "import esp; print(esp.__file__)"],
        cwd=impostor.parent, env=child_environment(), capture_output=True, text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).resolve() == Path(esp.__file__).resolve()


@pytest_twisted.ensureDeferred
async def test_worker_processes_share_the_helper_through_its_socket(scratch: Path) -> None:
    owner = DiskWriter(reactor, scratch / "maildir", shared=True)
    owner.start()
    address = owner.address
    assert address is not None
    directory = Path(address).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # this user's alone
    worker = SharedDiskWriter(reactor, scratch / "maildir", address)
    try:
        mine, theirs = await DeferredList([
            Deferred.fromCoroutine(owner.write([(b"from the parent\r\n", (("d/gil", ""),))])),
            Deferred.fromCoroutine(worker.write([(b"from a worker\r\n", (("d/gil", ""),))])),
        ], fireOnOneErrback=True, consumeErrors=True)
        assert isinstance(mine[1][0], list) and isinstance(theirs[1][0], list)
        assert theirs[1][0][0].path.read_bytes() == b"from a worker\r\n"
    finally:
        await worker.stop()
        await owner.stop()
    assert not directory.exists()  # the socket and its directory are gone with the helper


def _answers(sent: list[bytes]) -> list[tuple[int, tuple[object, ...]]]:
    frames = _Frames()
    return [answer for data in sent for answer in frames.feed(data)]


def test_the_writer_outlives_a_group_it_cannot_answer() -> None:
    """One thread answers every delivery of the node: a group whose answer cannot even be
    encoded fails on its own, and the next group is answered as usual."""
    sent: list[bytes] = []
    calls: list[int] = []

    def deliver(root: str, jobs: Sequence[Delivery]) -> list[Outcome]:
        calls.append(len(jobs))
        if len(calls) == 1:
            return [("stored", object())] * len(jobs)  # not something the frames carry
        return [("stored", ())] * len(jobs)

    channel = _Channel(-1, sent.append)
    deliveries = _Deliveries(deliver)
    deliveries.submit(channel, 1, "/root", [(b"m", (), ())])
    deliveries.deliver_next()
    deliveries.submit(channel, 2, "/root", [(b"m", (), ())])
    while deliveries.waiting:
        deliveries.deliver_next()
    assert calls == [1, 1]
    assert _answers(sent) == [(1, (("failed", "internal error"),)), (2, (("stored", ()),))]


def test_deliveries_waiting_are_grouped_in_order_up_to_the_limit() -> None:
    sent: list[bytes] = []
    groups: list[list[str]] = []

    def deliver(root: str, jobs: Sequence[Delivery]) -> list[Outcome]:
        groups.append([job[0].decode() for job in jobs])
        return [("stored", ())] * len(jobs)

    channel = _Channel(-1, sent.append)
    deliveries = _Deliveries(deliver, limit=4)
    deliveries.submit(channel, 1, "/root", [(b"a", (), ()), (b"b", (), ())])
    deliveries.submit(channel, 2, "/root", [(b"c", (), ())])
    deliveries.submit(channel, 3, "/root", [(b"d", (), ()), (b"e", (), ())])  # would be 5
    deliveries.submit(channel, 4, "/root", [(b"f", (), ())] * 6)  # over the limit alone
    while deliveries.waiting:
        deliveries.deliver_next()
    assert groups == [["a", "b", "c"], ["d", "e"], ["f"] * 6]
    assert [batch_id for batch_id, _ in _answers(sent)] == [1, 2, 3, 4]
    assert not deliveries.waiting


def test_deliveries_of_a_client_that_went_away_are_not_made() -> None:
    """A worker that disconnects has failed its deliveries to its senders, who will retry:
    those still waiting in the writer are dropped, not stored a first time."""
    sent: list[bytes] = []
    delivered: list[str] = []

    def deliver(root: str, jobs: Sequence[Delivery]) -> list[Outcome]:
        delivered.extend(job[0].decode() for job in jobs)
        return [("stored", ())] * len(jobs)

    gone = _Channel(-1, sent.append)
    here = _Channel(-1, sent.append)
    deliveries = _Deliveries(deliver)
    deliveries.submit(gone, 1, "/root", [(b"from the worker that left", (), ())])
    deliveries.submit(here, 2, "/root", [(b"from the main process", (), ())])
    gone.close()
    while deliveries.waiting:
        deliveries.deliver_next()
    assert delivered == ["from the main process"]
    assert _answers(sent) == [(2, (("stored", ()),))]


def test_a_channel_reads_what_is_there_without_waiting() -> None:
    """The writer reads between groups: a read never waits for more, carries at most
    READ_AT_ONCE bytes, and a request split across reads is whole once its last part came."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        channel = _Channel(read_end, lambda data: None)
        assert channel.read() == ([], False)  # nothing there: no wait
        big = _frame((1, "write", "/root", ((b"x" * (READ_AT_ONCE + 10), ()),)))
        small = _frame((2, "write", "/root", ((b"y", ()),)))
        sender = threading.Thread(target=lambda: os.write(write_end, big + small))
        sender.start()
        received: list[Any] = []
        while len(received) < 2:
            requests, ended = channel.read()
            assert not ended
            received.extend(requests)
        sender.join()
        assert [r[0] for r in received] == [1, 2]
        assert len(received[0][3][0][0]) == READ_AT_ONCE + 10
        os.close(write_end)
        write_end = -1
        assert channel.read() == ([], True)  # the other end closed
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest_twisted.ensureDeferred
async def test_a_large_message_reaches_the_helper_while_others_are_written(
    scratch: Path
) -> None:
    """Through the parent's pipe and a worker's socket, a message larger than what one read
    between two groups takes arrives whole, and the small ones sent with it are not held
    back by it."""
    owner = DiskWriter(reactor, scratch / "maildir", shared=True)
    owner.start()
    assert owner.address is not None
    worker = SharedDiskWriter(reactor, scratch / "maildir", owner.address)
    large = b"".join(b"%08d\r\n" % i for i in range((3 * READ_AT_ONCE) // 10))
    try:
        results = await DeferredList([
            Deferred.fromCoroutine(w.write([(body, (("d/hal", ""),))]))
            for w in (owner, worker)
            for body in (large, b"small one\r\n", large, b"small two\r\n")
        ], fireOnOneErrback=True, consumeErrors=True)
    finally:
        await worker.stop()
        await owner.stop()
    bodies = [(ok, value[0][0].path.read_bytes()) for ok, value in results]
    assert bodies == [(True, b) for b in (large, b"small one\r\n", large, b"small two\r\n")] * 2


@pytest_twisted.ensureDeferred
async def test_what_was_sent_before_the_helper_is_stopped_is_answered(scratch: Path) -> None:
    w = DiskWriter(reactor, scratch / "maildir")
    w.start()
    sent = [Deferred.fromCoroutine(w.write([(b"message %d\r\n" % i, (("d/ida", ""),))]))
            for i in range(20)]
    stopped = w.stop()  # closes the helper's stdin right behind the requests
    results = await DeferredList(sent, consumeErrors=True)
    await stopped
    assert all(ok and isinstance(value[0], list) for ok, value in results), results
    written = sorted(p.read_bytes() for p in (scratch / "maildir" / "d" / "ida" / "new").iterdir())
    assert written == sorted(b"message %d\r\n" % i for i in range(20))


class _Helper:
    """``serve`` in a thread of this process, on pipes and a Unix socket, without a database
    (deliveries are written, then answered "failed" and taken back)."""

    def __init__(self, scratch: Path) -> None:
        stdin_r, self.stdin = os.pipe()
        self.stdout, stdout_w = os.pipe()
        self.address = str(scratch / "writer.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(self.address)
        listening.listen(8)
        listening.setblocking(False)
        self.thread = threading.Thread(target=serve, args=(
            open(stdin_r, "rb", buffering=0), open(stdout_w, "wb"), listening))
        self.thread.start()

    def answers(self, count: int) -> list[Any]:
        frames, found = _Frames(), []
        while len(found) < count:
            readable, _, _ = select.select([self.stdout], [], [], 30)
            assert readable, "no answer from the helper"
            data = os.read(self.stdout, 1 << 16)
            assert data, "the helper closed its stdout"
            found.extend(frames.feed(data))
        return found

    def stop(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1
        self.thread.join(60)
        assert not self.thread.is_alive(), "the helper did not stop"
        os.close(self.stdout)


def test_deliveries_of_a_worker_gone_while_the_helper_stops_are_not_made(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the parent has stopped the helper, what was sent is still delivered, but a worker
    that goes away meanwhile has its deliveries still waiting dropped (its senders were told
    to retry), not made on the way out."""
    monkeypatch.delenv(DSN_VARIABLE, raising=False)
    staged: list[bytes] = []
    reached = {b"first": threading.Event(), b"second": threading.Event()}
    go_on = {b"first": threading.Event(), b"second": threading.Event()}
    real_stage = diskwriter.stage

    def stage(root: Path, message: bytes, boxes: Sequence[tuple[str, str]]) -> Any:
        staged.append(message)
        if message in reached:
            reached[message].set()
            go_on[message].wait(30)
        return real_stage(root, message, boxes)

    monkeypatch.setattr(diskwriter, "stage", stage)
    helper = _Helper(scratch)
    worker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        worker.connect(helper.address)
        root = str(scratch / "maildir")

        def delivery(body: bytes) -> Delivery:
            return (body, (("d/jo", ""),), ({},))

        # Three groups: two full ones, and one delivery behind them.
        worker.sendall(_frame((1, "deliver", root, (delivery(b"first"),) * GROUP_LIMIT))
                       + _frame((2, "deliver", root, (delivery(b"second"),) * GROUP_LIMIT))
                       + _frame((3, "deliver", root, (delivery(b"third"),))))
        assert reached[b"first"].wait(30), "the first group was never taken"
        os.close(helper.stdin)  # the parent stops the helper
        helper.stdin = -1
        go_on[b"first"].set()
        assert reached[b"second"].wait(30), "what was sent before the stop was not delivered"
        worker.close()  # the worker goes away during the second group
        go_on[b"second"].set()
    finally:
        for event in go_on.values():
            event.set()
        helper.stop()
    assert set(staged) == {b"first", b"second"}


def test_a_worker_that_cannot_be_answered_is_let_go_and_the_next_one_served(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker gone while its group was written cannot be answered: its connection is let
    go by the thread that watches it, and a worker that connects next (on the same
    descriptor number) is served."""
    monkeypatch.delenv(DSN_VARIABLE, raising=False)
    reached, go_on = threading.Event(), threading.Event()
    real_stage = diskwriter.stage

    def stage(root: Path, message: bytes, boxes: Sequence[tuple[str, str]]) -> Any:
        reached.set()
        go_on.wait(30)
        return real_stage(root, message, boxes)

    monkeypatch.setattr(diskwriter, "stage", stage)
    helper = _Helper(scratch)
    root = str(scratch / "maildir")
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(helper.address)
        first.sendall(_frame((1, "deliver", root, ((b"m", (("d/lee", ""),), ({},)),))))
        assert reached.wait(30), "the delivery was never taken"
        first.close()  # gone before its answer
        go_on.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
            second.connect(helper.address)
            second.sendall(_frame((2, "write", root, ((b"next\r\n", (("d/lee", ""),)),))))
            frames: list[Any] = []
            while not frames:
                readable, _, _ = select.select([second], [], [], 30)
                assert readable, "the next worker was not answered"
                data = second.recv(1 << 16)
                assert data, "the helper closed the next worker's connection"
                frames = _Frames().feed(data)
        assert frames[0][0] == 2 and frames[0][1][0][0] is True
    finally:
        go_on.set()
        helper.stop()


def test_a_malformed_request_fails_alone(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DSN_VARIABLE, raising=False)
    helper = _Helper(scratch)
    try:
        os.write(helper.stdin, _frame((1, "deliver", str(scratch), 5))
                 + _frame(("not an id", "write"))
                 + _frame((2, "write", str(scratch / "maildir"), ((b"fine\r\n", (("d/kim", ""),)),))))
        first, second = helper.answers(2)
    finally:
        helper.stop()
    assert first == (1, ())  # the client fails it: no outcome for its deliveries
    assert second[0] == 2 and second[1][0][0] is True


def test_socket_directories_left_by_a_killed_main_process_are_removed(scratch: Path) -> None:
    """Only this user's directories, old enough, whose socket nobody listens on."""
    def directory(name: str, listening: bool, age: float) -> tuple[Path, socket.socket]:
        path = scratch / name
        path.mkdir(mode=0o700)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path / "writer.sock"))
        if listening:
            server.listen(1)
        else:
            server.close()  # the name stays, nobody listens: what a SIGKILL leaves
        then = time.time() - age
        os.utime(path, (then, then))
        return path, server

    old = ABANDONED_AFTER + 60
    abandoned, _ = directory("esp-writer-abandoned", False, old)
    live, server = directory("esp-writer-live", True, old)
    starting, _ = directory("esp-writer-starting", False, 1)  # another instance, just made
    other = scratch / "something-else"
    other.mkdir()
    os.utime(other, (time.time() - old, time.time() - old))
    try:
        assert remove_abandoned_directories(scratch) == [abandoned]
    finally:
        server.close()
    assert not abandoned.exists()
    assert live.exists() and starting.exists() and other.exists()
