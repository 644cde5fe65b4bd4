"""Maildir delivery: durable, crash-safe, and never steered by a client's names."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esp.storage.maildir import (
    Maildir,
    MaildirError,
    folder_directory,
    publish_many,
    remove_files,
    stage,
    unique_name,
    user_directory,
)

MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


def make(tmp_path: Path) -> Maildir:
    box = Maildir(tmp_path / "example.test" / "bob")
    box.create()
    return box


def test_create_makes_private_cur_new_tmp(tmp_path: Path) -> None:
    box = make(tmp_path)
    for sub in ("cur", "new", "tmp"):
        info = (box.path / sub).stat()
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o700
    box.create()  # again: harmless


def test_deliver_puts_the_whole_message_in_new_with_its_size(tmp_path: Path) -> None:
    box = make(tmp_path)
    stored = box.deliver(MESSAGE)
    assert stored.path.parent == box.path / "new"
    assert stored.name.endswith(f",S={len(MESSAGE)}")
    assert stored.size == len(MESSAGE)
    assert stored.path.read_bytes() == MESSAGE
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600
    assert list((box.path / "tmp").iterdir()) == []
    assert box.read(stored.name) == MESSAGE
    assert list(box.messages()) == [stored.name]


def test_deliver_accepts_chunks(tmp_path: Path) -> None:
    box = make(tmp_path)
    stored = box.deliver([MESSAGE[:10], b"", MESSAGE[10:]])
    assert stored.path.read_bytes() == MESSAGE


def test_names_are_unique_and_follow_the_maildir_spec() -> None:
    names = {unique_name() for _ in range(1000)}
    assert len(names) == 1000
    for name in list(names)[:5]:
        assert "/" not in name and ":" not in name
        seconds, unique, _host = name.split(".", 2)
        assert seconds.isdigit()
        assert unique.startswith("M") and "P" in unique and "Q" in unique and "R" in unique


def test_a_message_found_in_cur_with_flags_is_located(tmp_path: Path) -> None:
    box = make(tmp_path)
    stored = box.deliver(MESSAGE)
    os.rename(stored.path, box.path / "cur" / f"{stored.name}:2,S")
    assert box.read(stored.name) == MESSAGE
    box.remove(stored.name)
    assert list(box.messages()) == []


def test_locate_takes_names_literally_not_as_patterns(tmp_path: Path) -> None:
    box = make(tmp_path)
    stored = box.deliver(MESSAGE)
    os.rename(stored.path, box.path / "cur" / f"{stored.name}:2,S")
    with pytest.raises(FileNotFoundError):
        box.locate("*")
    with pytest.raises(FileNotFoundError):
        box.locate(stored.name[:5] + "?" + stored.name[6:])


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = make(tmp_path)
    calls: list[str] = []
    paths: dict[int, str] = {}
    real_open, real_fsync, real_rename = os.open, os.fsync, os.rename

    def spy_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, *args, **kwargs)
        paths[fd] = str(path)
        return fd

    def spy_fsync(fd: int) -> None:
        where = paths.get(fd, "?")
        calls.append("fsync dir new" if where.endswith("/new") else
                     "fsync file" if "/tmp/" in where else f"fsync {where}")
        real_fsync(fd)

    def spy_rename(src, dst):  # type: ignore[no-untyped-def]
        calls.append("rename tmp->new")
        real_rename(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    box.deliver(MESSAGE)
    assert calls == ["fsync file", "rename tmp->new", "fsync dir new"]


def test_a_failed_directory_fsync_takes_the_message_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = make(tmp_path)
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the directory, after the rename
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(MaildirError, match="Input/output error"):
        box.deliver(MESSAGE)
    assert list((box.path / "new").iterdir()) == []
    assert list((box.path / "tmp").iterdir()) == []


def test_a_staged_message_is_written_back_early_renamed_then_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Local delivery's batches: write-back starts when the file is written, the renames come
    # before the fsyncs (one journal commit for all), the directory is synced last.
    calls: list[str] = []
    real_advise, real_fsync, real_rename = os.posix_fadvise, os.fsync, os.rename
    directories: set[int] = set()
    real_open = os.open

    def spy_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECTORY:
            directories.add(fd)
        return fd

    def spy_advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append("start write-back")
        real_advise(fd, offset, length, advice)

    def spy_fsync(fd: int) -> None:
        calls.append("fsync dir" if fd in directories else "fsync file")
        real_fsync(fd)

    def spy_rename(src, dst):  # type: ignore[no-untyped-def]
        calls.append("rename tmp->new")
        real_rename(src, dst)

    root = tmp_path / "mail"
    staged = stage(root, MESSAGE, [("example.test/bob", "")])  # creates the Maildir first
    calls.clear()
    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "posix_fadvise", spy_advise)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    second = stage(root, MESSAGE * 2, [("example.test/bob", "")])
    assert calls == ["start write-back"]
    calls.clear()
    results = publish_many([staged, second])
    # Every rename before the first fsync: one journal commit carries them all.
    assert calls == ["rename tmp->new", "rename tmp->new", "fsync file", "fsync file",
                     "fsync dir"]
    box = Maildir(root / "example.test" / "bob")
    assert sorted(f.read_bytes() for f in (box.path / "new").iterdir()) == [
        MESSAGE, MESSAGE * 2
    ]
    assert [[f.size for f in r] for r in results if isinstance(r, list)] == [
        [len(MESSAGE)], [len(MESSAGE) * 2]
    ]
    assert list((box.path / "tmp").iterdir()) == []


def test_a_failed_fsync_after_the_rename_takes_that_message_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mail"
    good = stage(root, MESSAGE, [("example.test/bob", "")])
    bad = stage(root, MESSAGE * 2, [("example.test/bob", "")])
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if fd == bad.fd:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results = publish_many([good, bad])
    assert isinstance(results[0], list)
    assert isinstance(results[1], MaildirError) and "Input/output error" in str(results[1])
    box = Maildir(root / "example.test" / "bob")
    # Only the message whose fsync worked is in new/; the other left nothing anywhere.
    assert [f.read_bytes() for f in (box.path / "new").iterdir()] == [MESSAGE]
    assert list((box.path / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", ["../../etc/passwd", ".hidden", "a/b"])
def test_locate_refuses_names_that_are_paths(tmp_path: Path, name: str) -> None:
    box = make(tmp_path)
    with pytest.raises(MaildirError):
        box.locate(name)


def _crash_during_delivery(tmp_path: Path, at: str) -> Path:
    """Run a delivery in a child process that SIGKILLs itself at ``at``; return the Maildir."""
    root = tmp_path / "box"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from esp.storage.maildir import Maildir
        box = Maildir(Path({str(root)!r}))
        box.create()
        at = {at!r}
        real_write, real_rename = os.write, os.rename
        def write(fd, data):
            if at == "mid-write":
                real_write(fd, bytes(data[: len(data) // 2]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(fd, data)
        def rename(src, dst):
            if at == "before-rename":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst)
        os.write, os.rename = write, rename
        box.deliver({MESSAGE!r} * 1000)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    return root


@pytest.mark.parametrize("at", ["mid-write", "before-rename"])
def test_a_crash_during_delivery_leaves_nothing_in_new(tmp_path: Path, at: str) -> None:
    root = _crash_during_delivery(tmp_path, at)
    box = Maildir(root)
    assert list((root / "new").iterdir()) == []
    assert list(box.messages()) == []
    leftovers = list((root / "tmp").iterdir())
    assert len(leftovers) == 1  # the debris of the crashed delivery, only in tmp/
    if at == "before-rename":
        assert leftovers[0].read_bytes() == MESSAGE * 1000  # written and fsync'd, not yet visible
    # A later delivery works, and the debris is cleaned once it is old enough.
    box.deliver(MESSAGE)
    assert len(list(box.messages())) == 1
    assert box.clean_tmp(now=time.time()) == 0
    assert box.clean_tmp(now=time.time() + 37 * 3600) == 1
    assert list((root / "tmp").iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    box = make(tmp_path)

    def chunks():  # type: ignore[no-untyped-def]
        yield MESSAGE
        raise OSError(28, "No space left on device")

    with pytest.raises(MaildirError, match="No space left"):
        box.deliver(chunks())
    assert list((box.path / "tmp").iterdir()) == []
    assert list((box.path / "new").iterdir()) == []


@pytest.mark.parametrize(
    "mailbox, expected",
    [
        ("INBOX", ""),
        ("inbox", ""),
        ("Sent", ".Sent"),
        ("Archive/2024", ".Archive.2024"),
        ("../../etc", ".%2E%2E.%2E%2E.etc"),
        ("..", ".%2E%2E"),
        ("a.b", ".a%2Eb"),
        ("/abs/path", "..abs.path"),
        ("Entwürfe", ".Entw%C3%BCrfe"),
        ("bad\x00name", ".bad%00name"),
    ],
)
def test_folder_names_never_escape_the_maildir(mailbox: str, expected: str) -> None:
    assert folder_directory(mailbox) == expected


def test_folder_directory_results_stay_inside(tmp_path: Path) -> None:
    box = make(tmp_path)
    for hostile in ["../x", "../../..", "a/../../b", "~root", "x" * 500, "%2E%2E"]:
        folder = box.folder(folder_directory(hostile))
        folder.create()
        assert folder.path.parent == box.path
        assert folder.path.name.startswith(".")
        assert len(folder.path.name) <= 255


def test_folder_refuses_raw_names(tmp_path: Path) -> None:
    box = make(tmp_path)
    for raw in ["..", ".", "Sent", "../x", ".a/b"]:
        with pytest.raises(MaildirError):
            box.folder(raw)


def test_user_directories_are_safe_and_distinct() -> None:
    assert user_directory("example.test", "alice") == "example.test/alice"
    assert user_directory("example.test", "john.smith") == "example.test/john.smith"
    hostile = [user_directory("example.test", local) for local in ["..", "a/b", ".x", "a%2Fb"]]
    assert all("/" not in d.split("/", 1)[1] and not d.split("/", 1)[1].startswith(".")
               for d in hostile)
    assert len(set(hostile)) == len(hostile)
    assert len(user_directory("example.test", "x" * 300).split("/")[1]) < 100


def test_taking_files_back_never_fails_itself(tmp_path: Path) -> None:
    # Cleanup after a failure: a file that cannot be removed (here a directory, as a
    # read-only filesystem would refuse any) must not stop the others or raise.
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    removable = tmp_path / "file"
    removable.write_bytes(b"x")
    remove_files([stuck, tmp_path / "missing", removable])
    assert stuck.exists() and not removable.exists()
