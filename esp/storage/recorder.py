"""Recording delivered files in the mailbox index, inside the Maildir writer process.

The writer (:mod:`esp.storage.diskwriter`) writes a group's files and, in the same thread,
records them with one call of ``esp_store_messages`` (``sql/002``, ``sql/003``) and one commit:
the reactor sends a group and waits for one answer.  The statement is *sent* before the files
are synced (:meth:`Recorder.begin`) and runs in PostgreSQL while they are; its result is read
and the transaction committed once they are durable (:meth:`Recorder.finish`), so rows never
become visible before their files.  The connection is asynchronous (libpq's non-blocking
mode, waited on with ``poll(2)``) so that one thread can do both: no thread hand-over on the
path of a group (a recording thread of its own cost two wake-ups per group, each a wait for a
CPU on a busy machine).  This process has no reactor; blocking waits are right here.

An outcome is one of:

- ``("stored", ((mailbox_id, uid, modseq), ...))``, one triple per message of the job;
- ``("over_quota", text)`` or ``("no_mailbox", text)``: that job alone was refused;
- ``("failed", text)``: nothing of it was committed;
- ``("unknown", text)``: the connection failed during the commit; the rows may exist.
"""

from __future__ import annotations

import contextlib
import json
import select
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg2
import psycopg2.extensions

from esp.storage.db import DatabaseUnavailable, Prepared
from esp.storage.mailstore import STORE_MESSAGES, rows_per_job
from esp.storage.outbox import events_sql, stored_events

Outcome = tuple[str, Any]
Jobs = Sequence[Sequence[Mapping[str, object]]]
_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR
# libpq does not apply connect_timeout to a non-blocking connection: we do (this, unless the
# DSN says otherwise).
CONNECT_TIMEOUT = 10.0
# A statement unanswered for this long is cancelled by the server (``statement_timeout``), and
# the group fails: it must not hold every delivery of the node forever behind a lock.  A
# server silent for GRACE seconds more is given up (the connection closed).
DEADLINE = 120.0
GRACE = 5.0


class _TimedOut(psycopg2.OperationalError):
    """No answer in time: the connection is closed, whatever it was doing is abandoned."""


def _connect_timeout(dsn: str) -> float:
    """The DSN's ``connect_timeout`` as libpq reads it (at least 2 s), else ours: never
    unbounded, whatever the DSN says (0 means "wait for ever" to libpq)."""
    value = psycopg2.extensions.parse_dsn(dsn).get("connect_timeout")
    seconds = float(value) if value else 0.0
    return max(seconds, 2.0) if seconds > 0 else CONNECT_TIMEOUT


def _wait(connection: Any, timeout: float) -> None:
    """Wait until ``connection``'s operation in progress is over (its error is raised here),
    at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            events = select.POLLIN
        elif state == psycopg2.extensions.POLL_WRITE:
            events = select.POLLOUT
        else:
            raise psycopg2.OperationalError(f"unexpected connection state {state}")
        # A new poller each time: while connecting, libpq may move to another socket.
        poller = select.poll()
        poller.register(connection.fileno(), events)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise _TimedOut(f"PostgreSQL did not answer within {timeout:g} s")


class Recorder:
    """One connection, opened when first needed and again after it failed.

    A group is recorded in two steps: :meth:`begin` sends ``BEGIN; EXECUTE ...`` (one round
    trip opens the transaction and runs the statement) and returns at once; :meth:`finish`,
    told which files are durable, reads the statement's rows and commits (the events of what
    was stored and ``COMMIT`` in one more round trip), or rolls back and records, in a
    transaction of their own, the jobs whose files are durable.  :meth:`record` does both for
    files already durable."""

    def __init__(self, dsn: str, statement: Prepared = STORE_MESSAGES,
                 deadline: float = DEADLINE) -> None:
        self._dsn = dsn
        self._statement = statement
        self._deadline = deadline
        self._connection: Any = None
        self._cursor: Any = None
        # What begin() left for finish(): None (the statement is on its way), or why not.
        self._begun: DatabaseUnavailable | None = None
        # Whether begin() used a connection that had served before (it may have died since).
        self._reused = False

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
            self._cursor = None

    def record(self, jobs: Jobs, again: bool = True) -> list[Outcome]:
        """Record ``jobs`` (each a list of message records, all or nothing) in one transaction;
        one outcome per job.  With ``again``, a connection found dead is replaced once."""
        if not jobs:
            return []
        self.begin(jobs)
        return self.finish(jobs, [None] * len(jobs), again)

    def begin(self, jobs: Jobs) -> None:
        """Send the statement for ``jobs`` in a transaction left open for :meth:`finish`;
        returns without waiting for it to run, and never raises (:meth:`finish` tells)."""
        self._reused = self._connection is not None and not self._connection.closed
        try:
            if not self._reused:
                self._open()
            self._cursor.execute(
                "BEGIN; " + self._statement.execute_sql,
                {"batch": json.dumps(_without_events(jobs), separators=(",", ":"))},
            )
            self._begun = None
        except DatabaseUnavailable as e:
            self._begun = e
        except Exception as e:  # the connection's state is unknown: never use it again
            self.close()
            self._begun = DatabaseUnavailable(f"database unavailable: {str(e).strip()}")

    def finish(self, jobs: Jobs, durable: Sequence[str | None],
               again: bool = True) -> list[Outcome]:
        """Commit what :meth:`begin` sent for ``jobs`` if all their files are durable (None in
        ``durable``); otherwise roll it back and record the jobs whose files are, in a
        transaction of their own.  The outcome of each job (those not durable fail with
        their reason)."""
        try:
            rows = self._rows()
        except DatabaseUnavailable as e:
            if again and self._reused and not isinstance(e.__cause__, _TimedOut):
                # The connection may have died since its last use: once more, on a new one.
                return self._durable_ones(
                    jobs, durable, lambda ready: self.record(ready, again=False))
            # Not committed (the transaction was still open): nothing of it exists.
            return [("failed", str(e) if state is None else state) for state in durable]
        except psycopg2.Error as e:
            if len(jobs) == 1 or isinstance(e, psycopg2.extensions.QueryCanceledError):
                # (Cancelled at the deadline: job by job would wait again, each.)
                return [("failed", state or str(e).strip()) for state in durable]
            # Whatever it was, one job must not hold back the others: each on its own.
            return self._durable_ones(jobs, durable, self._one_by_one)
        if all(state is None for state in durable):
            committed = self._commit(jobs, rows)
            if committed is not None:
                return committed
            # The group's events were refused (nothing was committed): each job on its own.
            if len(jobs) == 1:
                return [("failed", "its events were refused")]
            return self._one_by_one(jobs)
        self._rollback()
        return self._durable_ones(jobs, durable, lambda ready: self.record(ready, again))

    def _one_by_one(self, jobs: Jobs) -> list[Outcome]:
        result: list[Outcome] = []
        for job in jobs:
            result.extend(self.record([job], again=False))
            if self._connection is None:
                # The connection went away meanwhile: the others would only wait for a new
                # one too (their senders try again later).
                result.extend([("failed", "database unavailable")] * (len(jobs) - len(result)))
                break
        return result

    @staticmethod
    def _durable_ones(jobs: Jobs, durable: Sequence[str | None],
                      record: Callable[[Jobs], list[Outcome]]) -> list[Outcome]:
        """``record`` the jobs whose files are durable; the others fail with their reason."""
        recorded = iter(record([job for job, state in zip(jobs, durable, strict=True)
                                if state is None]))
        return [next(recorded) if state is None else ("failed", state) for state in durable]

    def _open(self) -> None:
        connection = None
        try:
            connection = psycopg2.connect(self._dsn, application_name="esp-delivery",
                                          async_=True)
            _wait(connection, _connect_timeout(self._dsn))
            cursor = connection.cursor()
            cursor.execute(
                "SET TIME ZONE 'UTC'; SET statement_timeout = %s; " + self._statement.prepare_sql,
                (int(self._deadline * 1000),))
            _wait(connection, self._deadline + GRACE)
        except (psycopg2.Error, ValueError) as e:
            if connection is not None:
                connection.close()
            raise DatabaseUnavailable(f"cannot use PostgreSQL: {str(e).strip()}") from e
        self._connection, self._cursor = connection, cursor

    def _rows(self) -> list[tuple[Any, ...]]:
        """The rows of the statement :meth:`begin` sent; raises DatabaseUnavailable (the
        connection is gone, or closed here) or the database's error (rolled back)."""
        if self._begun is not None:
            raise self._begun
        try:
            _wait(self._connection, self._deadline + GRACE)
            return list(self._cursor.fetchall())
        except psycopg2.Error as e:
            if e.pgcode is None or self._connection.closed:
                # Not the server's answer (the connection broke, or we gave up on it).
                self.close()
                raise DatabaseUnavailable(f"database unavailable: {str(e).strip()}") from e
            self._rollback()
            raise
        except Exception as e:
            self.close()
            raise DatabaseUnavailable(f"database unavailable: {e!r}") from e
        except BaseException:
            # Whatever the statement is doing, it must never be committed, nor its transaction
            # joined by the next one: the connection goes (and with it the transaction).
            self.close()
            raise

    def _commit(self, jobs: Jobs, rows: Sequence[Sequence[Any]]) -> list[Outcome] | None:
        """Commit the open transaction, with the events of what it stored; None if the events
        were refused (rolled back, nothing committed)."""
        try:
            # Read before the commit: rows that cannot be understood are rolled back, never
            # committed and then reported failed (their files would be removed).
            result = outcomes(jobs, rows)
        except Exception as e:
            self._rollback()
            return [("failed", f"unexpected answer: {e}")] * len(jobs)
        try:
            events = events_sql(self._cursor, stored_events(jobs, rows))
        except Exception:
            self._rollback()
            return None  # an event that cannot be written: job by job, it fails alone
        try:
            self._cursor.execute(events + b"COMMIT")
            _wait(self._connection, self._deadline + GRACE)
        except psycopg2.Error as e:
            return self._commit_failed(e, jobs)
        except Exception as e:
            self.close()  # whether it committed is unknown; the files stay
            return [("unknown", f"commit outcome unknown: {e!r}")] * len(jobs)
        except BaseException:
            self.close()
            raise
        return result

    def _commit_failed(self, e: psycopg2.Error, jobs: Jobs) -> list[Outcome] | None:
        status = (self._connection.info.transaction_status
                  if not self._connection.closed else None)
        if e.pgcode is not None and status == _INERROR:
            # The server refused what came before the COMMIT (the events): still in the
            # failed transaction, so the COMMIT never ran.
            self._rollback()
            return None
        if isinstance(e, psycopg2.extensions.TransactionRollbackError) and status == _IDLE:
            return [("failed", str(e).strip())] * len(jobs)
        if e.pgcode is None or status != _IDLE or isinstance(e, _LOST):
            # Not an answer of the server's to the COMMIT (the connection broke, libpq lost
            # track of it, or the COMMIT was cancelled, perhaps once done): it may have
            # committed, so the files must stay.
            self.close()
            return [("unknown", f"commit outcome unknown: {str(e).strip()}")] * len(jobs)
        # The server refused the COMMIT: the transaction is gone, nothing was committed.
        return [("failed", str(e).strip())] * len(jobs)

    def _rollback(self) -> None:
        """End the transaction :meth:`begin` opened, if it is still open."""
        try:
            if (self._connection is not None and not self._connection.closed
                    and self._connection.info.transaction_status != _IDLE):
                self._cursor.execute("ROLLBACK")
                _wait(self._connection, self._deadline + GRACE)
        except Exception:
            self.close()


def _without_events(jobs: Jobs) -> Jobs:
    """The records without the events they carry: those are written at the commit, with where
    each message went (:func:`esp.storage.outbox.stored_events`), and mean nothing to the
    statement."""
    if not any("event" in record for job in jobs for record in job):
        return jobs
    return [[{k: v for k, v in record.items() if k != "event"} for record in job]
            for job in jobs]


def outcomes(
    jobs: Sequence[Sequence[object]], rows: Sequence[Sequence[Any]]
) -> list[Outcome]:
    """What ``esp_store_messages`` did with each job, from its rows."""
    result: list[Outcome] = []
    for status, mine in rows_per_job(jobs, rows):
        if status == "stored":
            result.append(("stored", tuple((row[2], row[3], row[4]) for row in mine)))
        elif status == "over_quota":
            result.append(("over_quota", "no room for the message"))
        else:
            result.append(("no_mailbox", "a mailbox of the delivery does not exist"))
    return result
