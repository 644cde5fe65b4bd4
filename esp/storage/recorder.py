"""Recording delivered files in the mailbox index, inside the Maildir writer process.

The writer (:mod:`esp.storage.diskwriter`) writes a batch's files and, in the same process,
records them with one call of ``esp_store_messages`` (``sql/002``, ``sql/003``) and one commit:
the reactor sends a batch and waits for one answer, instead of waiting for the files, then
sending the rows, then waiting again (each wait on a busy reactor cost milliseconds of
queueing).  :class:`GroupRecorder` runs the statement while the files are being fsync'd and
commits once they are durable, for every batch waiting at that moment at once.  Blocking calls
on a plain psycopg2 connection are right here: this process has no reactor.

An outcome is one of:

- ``("stored", ((mailbox_id, uid, modseq), ...))``, one triple per message of the job;
- ``("over_quota", text)`` or ``("no_mailbox", text)``: that job alone was refused;
- ``("failed", text)``: nothing of it was committed;
- ``("unknown", text)``: the connection failed during the commit; the rows may exist.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import psycopg2

from esp.storage.db import DatabaseUnavailable, Prepared, connect
from esp.storage.groupqueue import GroupQueue
from esp.storage.mailstore import STORE_MESSAGES, rows_per_job
from esp.storage.outbox import insert_events_txn, stored_events

Outcome = tuple[str, Any]
_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
# Subclasses of OperationalError that leave the connection sound and the transaction surely
# rolled back (a deadlock, a serialization failure, a cancelled statement).
_REFUSED = (psycopg2.extensions.TransactionRollbackError, psycopg2.extensions.QueryCanceledError)


class Recorder:
    """One connection, opened when first needed and again after it failed.

    The connection is in autocommit mode and the transaction is opened by the statement's own
    round trip (``BEGIN; EXECUTE ...``) and ended with ``COMMIT`` or ``ROLLBACK``: in its
    default mode psycopg2 sends ``BEGIN`` alone first and waits for its answer, one round trip
    more on the path of every batch."""

    def __init__(self, dsn: str, statement: Prepared = STORE_MESSAGES) -> None:
        self._dsn = dsn
        self._statement = statement
        self._connection: Any = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def record(self, jobs: Sequence[Sequence[Mapping[str, object]]]) -> list[Outcome]:
        """Record ``jobs`` (each a list of message records, all or nothing) in one transaction;
        one outcome per job."""
        if not jobs:
            return []
        try:
            rows = self.execute(jobs)
        except DatabaseUnavailable as e:
            # Not committed (the transaction was still open): nothing of it exists.
            return [("failed", str(e))] * len(jobs)
        except psycopg2.Error as e:
            if len(jobs) == 1:
                return [("failed", str(e).strip())]
            # Whatever it was, one job must not hold back the others: each on its own.
            return [self.record([job])[0] for job in jobs]
        return self.commit(jobs, rows)

    def execute(self, jobs: Sequence[Sequence[Mapping[str, object]]]) -> list[tuple[Any, ...]]:
        """Run the statement for ``jobs`` in a transaction left open: :meth:`commit` or
        :meth:`rollback` it.  Raises DatabaseUnavailable (the connection is gone) or the
        database's error (rolled back)."""
        try:
            if self._connection is None or self._connection.closed:
                self._connection = connect(self._dsn, "esp-delivery")
                self._connection.autocommit = True
            with self._connection.cursor() as cur:
                self._statement.execute(
                    cur, {"batch": json.dumps(jobs, separators=(",", ":"))}, begin=True
                )
                rows = list(cur.fetchall())
                # The events of what was stored, in the same transaction (the outbox).
                insert_events_txn(cur, stored_events(jobs, rows))
                return rows
        except _REFUSED:
            self.rollback()
            raise
        except _LOST as e:
            self.close()
            raise DatabaseUnavailable(f"database unavailable: {str(e).strip()}") from e
        except psycopg2.Error:
            self.rollback()
            raise
        except BaseException:
            # Ours, after the statement ran (the events of its rows): never leave its
            # transaction open for the next statement to join.
            self.rollback()
            raise

    def commit(
        self, jobs: Sequence[Sequence[Mapping[str, object]]], rows: Sequence[Sequence[Any]]
    ) -> list[Outcome]:
        """Commit what :meth:`execute` did; the outcome of each job."""
        try:
            # Read before the commit: rows that cannot be understood are rolled back, never
            # committed and then reported failed (their files would be removed).
            result = outcomes(jobs, rows)
        except Exception as e:
            self.rollback()
            return [("failed", f"unexpected answer: {e}")] * len(jobs)
        try:
            with self._connection.cursor() as cur:
                cur.execute("COMMIT")
        except _REFUSED as e:
            self.rollback()
            return [("failed", str(e).strip())] * len(jobs)
        except _LOST as e:
            self.close()
            return [("unknown", f"connection lost during commit: {str(e).strip()}")] * len(jobs)
        except psycopg2.Error as e:
            if e.pgcode is None or self._connection.info.transaction_status != _IDLE:
                # Not an answer of the server's to the COMMIT (libpq lost track of the
                # connection): it may have committed, so the files must stay.
                self.close()
                return [("unknown", f"commit outcome unknown: {str(e).strip()}")] * len(jobs)
            # The server refused the COMMIT: the transaction is gone, nothing was committed.
            return [("failed", str(e).strip())] * len(jobs)
        return result

    def rollback(self) -> None:
        """End the transaction :meth:`execute` opened, if it is still open."""
        try:
            if (self._connection is not None and not self._connection.closed
                    and self._connection.info.transaction_status != _IDLE):
                with self._connection.cursor() as cur:
                    cur.execute("ROLLBACK")
        except psycopg2.Error:
            self.close()


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


class _Waiting:
    def __init__(
        self, jobs: Sequence[Sequence[Mapping[str, object]]], durable: Future[list[str | None]]
    ) -> None:
        self.jobs = jobs
        self.durable = durable
        self.outcomes: Future[list[Outcome]] = Future()


class GroupRecorder:
    """Group commit across the writer's threads.

    Each thread hands over its jobs with a future that says, per job, when its files are
    durable (None) or why they could not be made so.  One recording thread takes every job
    waiting (up to ``limit``), runs one statement for all of them while their fsyncs are still
    under way, and commits once every file is durable: rows never become visible before their
    files, and the deliveries that arrive during a commit share the next one.
    """

    def __init__(self, recorder: Recorder, limit: int = 32) -> None:
        self._recorder = recorder
        self._waiting: GroupQueue[_Waiting] = GroupQueue(limit, lambda w: len(w.jobs))
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def submit(
        self, jobs: Sequence[Sequence[Mapping[str, object]]], durable: Future[list[str | None]]
    ) -> Future[list[Outcome]]:
        """The outcome of each of ``jobs``, once recorded (or not)."""
        waiting = _Waiting(jobs, durable)
        if not self._waiting.put(waiting):
            waiting.outcomes.set_result([("failed", "the writer is stopping")] * len(jobs))
        return waiting.outcomes

    def close(self) -> None:
        """Record what is waiting, then stop."""
        self._waiting.close()
        self._thread.join()
        self._recorder.close()

    def _run(self) -> None:
        while (taken := self._waiting.take()) is not None:
            try:
                outcomes = self._record(taken)
            except Exception as e:  # a bug: fail these, keep recording
                outcomes = [[("failed", f"internal error: {e!r}")] * len(w.jobs) for w in taken]
            for waiting, result in zip(taken, outcomes, strict=True):
                waiting.outcomes.set_result(result)

    def _record(self, taken: list[_Waiting]) -> list[list[Outcome]]:
        jobs = [job for waiting in taken for job in waiting.jobs]
        try:
            rows: list[tuple[Any, ...]] | None = self._recorder.execute(jobs)
        except Exception:
            rows = None  # recorded below, the slow way, once the files are durable
        try:
            durable = [state for waiting in taken for state in waiting.durable.result()]
        except BaseException:
            if rows is not None:
                self._recorder.rollback()  # never leave the transaction open
            raise
        if rows is not None and all(state is None for state in durable):
            flat = self._recorder.commit(jobs, rows)
        else:
            if rows is not None:
                self._recorder.rollback()
            again = iter(self._recorder.record(
                [job for job, state in zip(jobs, durable, strict=True) if state is None]
            ))
            flat = [next(again) if state is None else ("failed", state) for state in durable]
        result = []
        position = 0
        for waiting in taken:
            result.append(flat[position:position + len(waiting.jobs)])
            position += len(waiting.jobs)
        return result
