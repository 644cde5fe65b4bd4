"""Recording delivered files in the mailbox index, inside the Maildir writer process.

The writer (:mod:`esp.storage.diskwriter`) makes a batch's files durable and then, in the same
process, records them with one call of ``esp_store_messages`` (``sql/002``, ``sql/003``) and one
commit: the reactor sends a batch and waits for one answer, instead of waiting for the files,
then sending the rows, then waiting again (each wait on a busy reactor cost milliseconds of
queueing).  Blocking calls on a plain psycopg2 connection are right here: this process has no
reactor.

An outcome is one of:

- ``("stored", ((mailbox_id, uid, modseq), ...))``, one triple per message of the job;
- ``("over_quota", text)`` or ``("no_mailbox", text)``: that job alone was refused;
- ``("failed", text)``: nothing of it was committed;
- ``("unknown", text)``: the connection failed during the commit; the rows may exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2

from esp.storage.db import DatabaseUnavailable, Prepared, connect
from esp.storage.mailstore import STORE_MESSAGES

Outcome = tuple[str, Any]
_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Recorder:
    """One connection, opened when first needed and again after it failed."""

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
            if self._connection is None or self._connection.closed:
                self._connection = connect(self._dsn, "esp-delivery")
        except DatabaseUnavailable as e:
            return [("failed", str(e))] * len(jobs)
        connection = self._connection
        try:
            with connection.cursor() as cur:
                self._statement.execute(
                    cur, {"batch": json.dumps(jobs, separators=(",", ":"))}
                )
                rows = cur.fetchall()
        except _LOST as e:
            # Not committed (the transaction was still open): nothing of it exists.
            self.close()
            return [("failed", f"database unavailable: {str(e).strip()}")] * len(jobs)
        except psycopg2.Error as e:
            connection.rollback()
            if len(jobs) == 1:
                return [("failed", str(e).strip())]
            # Whatever it was, one job must not hold back the others: each on its own.
            return [self.record([job])[0] for job in jobs]
        try:
            connection.commit()
        except _LOST as e:
            self.close()
            return [("unknown", f"connection lost during commit: {str(e).strip()}")] * len(jobs)
        except psycopg2.Error as e:
            connection.rollback()
            return [("failed", str(e).strip())] * len(jobs)
        return outcomes(jobs, rows)


def outcomes(
    jobs: Sequence[Sequence[object]], rows: Sequence[Sequence[Any]]
) -> list[Outcome]:
    """What ``esp_store_messages`` did with each job, from its rows (one per message, in
    order: job index, status, mailbox id, UID, MODSEQ)."""
    result: list[Outcome] = []
    position = 0
    for index, job in enumerate(jobs):
        mine = rows[position:position + len(job)]
        position += len(job)
        if len(mine) != len(job) or any(row[0] != index for row in mine):
            raise RuntimeError("esp_store_messages answered out of order")
        status = mine[0][1]
        if status == "stored":
            result.append(("stored", tuple((row[2], row[3], row[4]) for row in mine)))
        elif status == "over_quota":
            result.append(("over_quota", "no room for the message"))
        else:
            result.append(("no_mailbox", "a mailbox of the delivery does not exist"))
    return result
