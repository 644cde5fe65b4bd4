"""The Maildir writer process: durable files for batches of jobs, each job on its own; a helper
that dies is replaced, and the deliveries it held fail instead of hanging."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

import esp
from esp.children import child_environment
from esp.storage.diskwriter import DiskWriter, SharedDiskWriter
from esp.storage.maildir import MaildirError
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
