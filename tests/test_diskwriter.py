"""The Maildir writer process: durable files for batches of jobs, each job on its own; a helper
that dies is replaced, and the deliveries it held fail instead of hanging."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

import esp
from esp.children import child_environment
from esp.storage.diskwriter import (
    Delivery,
    DiskWriter,
    SharedDiskWriter,
    _Channel,
    _Deliveries,
    _Frames,
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


def test_the_delivery_thread_outlives_a_group_it_cannot_answer() -> None:
    """One thread answers every delivery of the node: a group whose answer cannot even be
    encoded fails on its own, and the next group is answered as usual."""
    sent: list[bytes] = []
    calls: list[int] = []
    first_taken, go_on = threading.Event(), threading.Event()

    def deliver(root: str, jobs: Sequence[Delivery]) -> list[Outcome]:
        calls.append(len(jobs))
        if len(calls) == 1:
            first_taken.set()
            go_on.wait(30)  # the second request arrives meanwhile: a group of its own
            return [("stored", object())] * len(jobs)  # not something the frames carry
        return [("stored", ())] * len(jobs)

    channel = _Channel(-1, sent.append)
    deliveries = _Deliveries(deliver)
    try:
        deliveries.submit(channel, 1, "/root", [(b"m", (), ())])
        assert first_taken.wait(30), "the first group was never taken"
        deliveries.submit(channel, 2, "/root", [(b"m", (), ())])
        go_on.set()
    finally:
        go_on.set()
        deliveries.close()  # answers what is waiting, then stops
    assert calls == [1, 1]
    assert _answers(sent) == [(1, (("failed", "internal error"),)), (2, (("stored", ()),))]


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
    gone.close()
    deliveries = _Deliveries(deliver)
    deliveries.submit(gone, 1, "/root", [(b"from the worker that left", (), ())])
    deliveries.submit(here, 2, "/root", [(b"from the main process", (), ())])
    deliveries.close()
    assert delivered == ["from the main process"]
    assert _answers(sent) == [(2, (("stored", ()),))]
