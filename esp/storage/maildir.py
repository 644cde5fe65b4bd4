"""Maildir bodies: one file per message, written durably.

Delivery follows the Maildir rules: the message is written to ``tmp/`` under a unique name,
fsync'd, renamed into ``new/`` and the directory fsync'd, so a crash at any point leaves either
nothing in ``new/`` or the whole message there.  Local delivery's batches (:func:`stage`,
:func:`publish_many`) differ in one point: they start the file's write-back when it is
written, rename it into ``new/`` and only then fsync the file and the directory, which on ext4
costs one journal commit instead of two (the rename rides with the file's data).  The message
counts as delivered only after both fsyncs, as before; a crash between the rename and the
fsync can leave an incomplete file in ``new/`` on a filesystem that does not write data before
the metadata that names it (ext4's default data=ordered does).  No index row names such a file
(rows are committed after the fsyncs), so ESP never serves it, and its sender, never answered,
sends the message again.  Folders follow Maildir++ (``.Name`` directories beside ``cur new
tmp``).  Directory names come from :func:`folder_directory` and
:func:`user_directory`, never straight from what a client sent.

All functions here block; callers on the reactor run them in a thread pool.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

_SUBDIRS = ("cur", "new", "tmp")
# Maildir spec: files left in tmp/ for 36 hours are debris of a crashed delivery.
TMP_MAX_AGE = 36 * 3600
_MAX_DIRNAME = 200
_counter = itertools.count(1)
# Maildirs this process has seen complete; a removed one is noticed when a delivery fails.
_known_maildirs: set[Path] = set()


class MaildirError(Exception):
    """A Maildir operation failed (disk full, permissions...)."""


def fsync_directory(path: Path) -> None:
    """Make the entries of ``path`` (files created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hostname() -> str:
    # Maildir spec: '/' and ':' in the host part are written as \057 and \072.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


# Fixed per process (and renewed in a forked child): every system call in the delivery path
# costs a GIL hand-off between the disk thread and the reactor, so none is spent on these.
_process: tuple[int, str, str] = (0, "", "")


def _process_identity() -> tuple[int, str, str]:
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, secrets.token_hex(4), _hostname())
    return _process


def unique_name() -> str:
    """A file name no other delivery on any host can produce: time.M<usec>P<pid>Q<n>R<rand>.host."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    pid, random_part, host = _process_identity()
    return f"{seconds}.M{micros}P{pid}Q{next(_counter)}R{random_part}.{host}"


def _safe_component(text: str, keep_inner_dots: bool = False) -> str:
    # Letters, digits, space, '_' and '-' stay; everything else (including '/', '%' and, in
    # folder names, '.') is percent-encoded, so the mapping is one-to-one and can never yield
    # '.', '..', a hidden name or a path separator.
    encoded = "".join(
        c if c.isascii() and (c.isalnum() or c in " _-") else quote(c, safe="")
        for c in text
    )
    encoded = encoded.replace(".", "%2E").replace("~", "%7E")
    if keep_inner_dots and not text.startswith(".") and ".." not in text:
        encoded = encoded.replace("%2E", ".")
    return encoded


def user_directory(domain: str, localpart: str) -> str:
    """The Maildir of a user, relative to the Maildir root: ``<domain>/<localpart>``."""
    local = _safe_component(localpart, keep_inner_dots=True)
    if len(local) > _MAX_DIRNAME:
        local = "~" + hashlib.sha256(localpart.encode("utf-8")).hexdigest()
    return f"{_safe_component(domain, keep_inner_dots=True)}/{local}"


def folder_directory(mailbox_name: str) -> str:
    """The Maildir++ folder for an IMAP mailbox name ('/' hierarchy); '' for INBOX."""
    if mailbox_name.upper() == "INBOX":
        return ""
    encoded = "." + ".".join(_safe_component(part) for part in mailbox_name.split("/"))
    if len(encoded) > _MAX_DIRNAME:
        encoded = ".~" + hashlib.sha256(mailbox_name.encode("utf-8")).hexdigest()
    return encoded


@dataclass(frozen=True)
class StoredFile:
    """A message file now durable in ``new/``."""

    name: str
    path: Path
    size: int


class Maildir:
    """One Maildir: a user's INBOX or one of its Maildir++ folders."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def folder(self, directory: str) -> Maildir:
        """The Maildir++ folder ``directory`` (from :func:`folder_directory`) of this Maildir."""
        if directory == "":
            return self
        if not directory.startswith(".") or "/" in directory or directory in (".", ".."):
            raise MaildirError(f"{directory!r} is not a Maildir++ folder name")
        return Maildir(self.path / directory)

    def create(self) -> None:
        """Make ``cur new tmp`` (mode 0700) and any missing parents; harmless when they exist.

        Every directory made here, and the directory holding it, is fsync'd, so a crash cannot
        lose a folder that a committed message row already points into.
        """
        if self.path in _known_maildirs:
            return
        if all((self.path / sub).is_dir() for sub in _SUBDIRS):
            _known_maildirs.add(self.path)
            return
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in _SUBDIRS:
            (self.path / sub).mkdir(mode=0o700, exist_ok=True)
        for directory in (self.path, *missing):
            fsync_directory(directory)
            fsync_directory(directory.parent)
        _known_maildirs.add(self.path)

    def deliver(
        self, data: bytes | Iterable[bytes], sync_directory: bool = True,
        name: str | None = None,
    ) -> StoredFile:
        """Write a message durably into ``new/`` and return its file name.

        With ``sync_directory`` false the caller fsyncs ``new/`` (once for many files) before
        it counts the message as delivered.  ``name`` is the final name to use (a copy of a
        message already delivered elsewhere under that name), else a new unique one.
        """
        base = unique_name()
        tmp = self.path / "tmp" / base
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise MaildirError(f"cannot create {tmp}: {e.strerror}") from e
        try:
            try:
                chunks = [data] if isinstance(data, bytes) else data
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                        size += written
                os.fsync(fd)
            finally:
                os.close(fd)
            name = name or f"{base},S={size}"
            final = self.path / "new" / name
            os.rename(tmp, final)
            if sync_directory:
                try:
                    fsync_directory(self.path / "new")
                except OSError:
                    # Not known to be durable, so not delivered: take it back first.
                    final.unlink(missing_ok=True)
                    raise
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MaildirError(f"cannot deliver into {self.path}: {e.strerror}") from e
        return StoredFile(name, final, size)

    def locate(self, name: str) -> Path:
        """The current path of message ``name`` (in ``new/``, or in ``cur/`` with any flags)."""
        if "/" in name or name.startswith("."):
            raise MaildirError(f"{name!r} is not a Maildir file name")
        candidate = self.path / "new" / name
        if candidate.exists():
            return candidate
        candidate = self.path / "cur" / name
        if candidate.exists():
            return candidate
        for entry in (self.path / "cur").glob(glob.escape(name) + ":*"):
            return entry
        raise FileNotFoundError(f"{name} is not in {self.path}")

    def read(self, name: str) -> bytes:
        return self.locate(name).read_bytes()

    def remove(self, name: str) -> None:
        self.locate(name).unlink()

    def messages(self) -> Iterator[str]:
        """Base names (without ':2,' info) of every message in ``new/`` and ``cur/``."""
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                if entry.is_file() and not entry.name.startswith("."):
                    yield entry.name.split(":", 1)[0]

    def holds_mail(self) -> bool:
        """Whether any message file is in this Maildir or one of its folders."""
        if not self.path.is_dir():
            return False
        for directory in (self.path, *(p for p in self.path.iterdir() if p.name.startswith("."))):
            for sub in ("new", "cur"):
                try:
                    if any(e.is_file() for e in os.scandir(directory / sub)):
                        return True
                except (FileNotFoundError, NotADirectoryError):
                    continue
        return False

    def clean_tmp(self, max_age: float = TMP_MAX_AGE, now: float | None = None) -> int:
        """Remove files left in ``tmp/`` by crashed deliveries; return how many."""
        cutoff = (time.time() if now is None else now) - max_age
        removed = 0
        for entry in os.scandir(self.path / "tmp"):
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        return removed


# One delivery: the message, and the (Maildir relative to the root, Maildir++ folder) of each
# mailbox that receives it.
Job = tuple[bytes, Sequence[tuple[str, str]]]


def deliver_many(
    root: Path, jobs: Sequence[Job], executor: Executor | None = None
) -> list[list[StoredFile] | MaildirError]:
    """Deliver every job's files, then fsync each directory once for all of them.

    Each job is all or nothing and fails on its own.  With an ``executor`` the jobs run in
    parallel (their fsyncs overlap on the device).
    """
    results: list[list[StoredFile] | MaildirError]
    if executor is None:
        results = [_deliver_job(root, job) for job in jobs]
    else:
        results = list(executor.map(lambda job: _deliver_job(root, job), jobs))
    _sync_directories(results)
    return results


def _sync_directories(results: list[list[StoredFile] | MaildirError]) -> None:
    """fsync each directory that received files once; the files of a directory that cannot
    be synced are taken back and their results become errors."""
    directories: dict[Path, list[int]] = {}
    for index, files in enumerate(results):
        if isinstance(files, list):
            for stored in files:
                directories.setdefault(stored.path.parent, []).append(index)
    for directory, indexes in directories.items():
        try:
            fsync_directory(directory)
        except OSError as e:
            # Not known to be durable, so not delivered: take those files back.
            for index in indexes:
                done = results[index]
                if isinstance(done, list):
                    remove_files([f.path for f in done])
                    results[index] = MaildirError(f"cannot sync {directory}: {e.strerror}")


def _deliver_job(root: Path, job: Job) -> list[StoredFile] | MaildirError:
    try:
        return deliver_unsynced(root, *job)
    except MaildirError as e:
        return e
    except OSError as e:
        return MaildirError(f"cannot deliver: {e}")


def deliver_unsynced(
    root: Path, message: bytes, boxes: Sequence[tuple[str, str]]
) -> list[StoredFile]:
    """One file per mailbox (hard links where possible), each fsync'd; the caller fsyncs the
    ``new/`` directories before counting them as delivered."""
    return publish(stage(root, message, boxes)) if boxes else []


@dataclass
class Staged:
    """A message written to the ``tmp/`` of its first mailbox: its final name (the same in
    every mailbox) and size are known, it is neither durable nor visible yet."""

    name: str
    size: int
    tmp: Path
    fd: int  # still open, for the fsync
    boxes: tuple[Maildir, ...]
    message: bytes


def stage(root: Path, message: bytes, boxes: Sequence[tuple[str, str]]) -> Staged:
    """Write ``message`` to ``tmp/`` of the first of ``boxes`` (a Maildir relative to
    ``root`` and a Maildir++ folder each), without fsync; :func:`publish` finishes it."""
    if not boxes:
        raise MaildirError("a delivery needs a mailbox")
    maildirs = tuple(Maildir(root / maildir).folder(folder) for maildir, folder in boxes)
    try:
        for box in maildirs:
            box.create()
    except OSError as e:
        raise MaildirError(f"cannot create a Maildir: {e}") from e
    base = unique_name()
    tmp = maildirs[0].path / "tmp" / base
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise MaildirError(f"cannot create {tmp}: {e.strerror}") from e
    try:
        view = memoryview(message)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise MaildirError(f"cannot write {tmp}: {e.strerror}") from e
    start_writeback(fd)
    return Staged(f"{base},S={len(message)}", len(message), tmp, fd, maildirs, message)


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages now, without waiting (Linux queues the write-back of
    dirty pages on POSIX_FADV_DONTNEED, and allocates their blocks): its fsync then finds them
    on their way, and on ext4 the rename that follows is committed with them."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # a hint only
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def publish(staged: Staged) -> list[StoredFile]:
    """Put a staged message in ``new/`` of each of its mailboxes (hard links, or copies under
    the same name across filesystems), then fsync it: one journal commit covers the file and
    its names.  The caller fsyncs those directories before the message counts as delivered.
    On failure nothing of it is left and MaildirError is raised."""
    result = publish_many([staged], sync_directories=False)[0]
    if isinstance(result, MaildirError):
        raise result
    return result


def publish_many(
    staged: Sequence[Staged], sync_directories: bool = True
) -> list[list[StoredFile] | MaildirError]:
    """Put every staged message in ``new/`` of its mailboxes, then fsync each file, then (with
    ``sync_directories``) each directory once; one result per message, failures on their own.

    All the renames come before the first fsync: that fsync's journal commit carries every
    name and every block whose write-back :func:`stage` started, so the fsyncs after it find
    little left to do, in this one thread, without handing files to others."""
    results: list[list[Path] | MaildirError] = []
    try:
        for item in staged:
            try:
                results.append(_place(item))
            except Exception as e:  # a bug: this one fails, the others go on
                results.append(e if isinstance(e, MaildirError)
                               else MaildirError(f"cannot deliver: {e!r}"))
        for index, (item, made) in enumerate(zip(staged, results, strict=True)):
            if isinstance(made, MaildirError):
                continue
            try:
                os.fsync(item.fd)
            except OSError as e:
                remove_files(made)
                results[index] = MaildirError(
                    f"cannot deliver into {item.boxes[0].path}: {e.strerror}")
    finally:
        for item in staged:
            with contextlib.suppress(OSError):
                os.close(item.fd)
    published: list[list[StoredFile] | MaildirError] = [
        [StoredFile(item.name, path, item.size) for path in made]
        if isinstance(made, list) else made
        for item, made in zip(staged, results, strict=True)
    ]
    if sync_directories:
        _sync_directories(published)
    return published


def _place(staged: Staged) -> list[Path]:
    """Rename a staged file into ``new/`` of its first mailbox and link it into the others';
    on failure nothing of it is left (its descriptor stays open) and MaildirError is raised."""
    made: list[Path] = []
    try:
        first = staged.boxes[0].path / "new" / staged.name
        os.rename(staged.tmp, first)
        made.append(first)
        for box in staged.boxes[1:]:
            target = box.path / "new" / staged.name
            try:
                os.link(first, target)
            except FileExistsError:
                raise
            except OSError:
                # Another filesystem: a copy of its own, under the same name.
                box.deliver(staged.message, sync_directory=False, name=staged.name)
            made.append(target)
    except (OSError, MaildirError) as e:
        staged.tmp.unlink(missing_ok=True)
        remove_files(made)
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise MaildirError(f"cannot deliver into {staged.boxes[0].path}: {reason}") from e
    return made


def remove_files(paths: Iterable[Path]) -> None:
    """Take files back, as far as possible: this cleans up after a failure, and must not
    fail itself (a file it cannot remove is an orphan no index row names)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def retire(root: Path, relative: str) -> Path | None:
    """Move a removed user's Maildir aside to ``<root>/.removed/`` so a new account with the same
    address starts empty; return where it went (None if there was nothing)."""
    source = root / relative
    if not source.exists():
        return None
    stamp = f"{time.strftime('%Y%m%d%H%M%S')}.{secrets.token_hex(3)}"
    target = root / ".removed" / f"{relative}.{stamp}"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.rename(source, target)
    fsync_directory(source.parent)
    fsync_directory(target.parent)
    return target
