"""The PostgreSQL connection pool: every operation is a named transaction run in a pool thread.

Transaction functions (``*_txn``) take a DB-API cursor and run plain SQL.  The service calls them
through :meth:`Database.run`; the admin CLI calls the very same functions with its own connection
through :func:`run_sync`, so both share one code path to the data.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg2
import psycopg2.extensions
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger

Cursor = psycopg2.extensions.cursor
P = ParamSpec("P")
T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached or refused the operation for a reason outside our data."""


# Errors that mean "the database is not there right now", as opposed to a bug or bad data.
TRANSIENT_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Prepared:
    """A hot statement, prepared once on every connection (``PREPARE``), run with ``EXECUTE``.

    Parsing and planning the delivery statements costs PostgreSQL as much CPU as running them;
    preparing halves it.  Parameters are written ``%(name)s`` as for any other statement.
    """

    def __init__(self, name: str, sql: str) -> None:
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.name = name
        self.prepare_sql = f"PREPARE {name} AS " + _NAMED.sub(positional, sql)
        arguments = ", ".join(f"%({n})s" for n in names)
        self.execute_sql = f"EXECUTE {name}({arguments})" if names else f"EXECUTE {name}"

    def execute(self, cur: Cursor, params: dict[str, Any]) -> None:
        # Prepared on first use per connection (a PREPARE outlives a rolled-back transaction).
        done = _prepared.setdefault(cur.connection, set())
        if self.name not in done:
            cur.execute(self.prepare_sql)
            done.add(self.name)
        cur.execute(self.execute_sql, params)


_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


_NAMED = re.compile(r"%\((\w+)\)s")


def _prepare_connection(connection: Any) -> None:
    with connection.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    connection.commit()


class Database:
    """A pool of psycopg2 connections used from Twisted through adbapi."""

    log = Logger()

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        min_connections: int = 1,
        max_connections: int = 10,
        application_name: str = "esp",
    ) -> None:
        self.dsn = dsn
        self._reactor = reactor
        self._min = min_connections
        self._max = max(min_connections, max_connections)
        self._application_name = application_name
        self._pool: adbapi.ConnectionPool | None = None
        self._running = 0  # transactions handed to the pool and not yet finished

    def load(self) -> tuple[int, int]:
        """(connections in use, transactions waiting for one), for the metrics."""
        return min(self._running, self._max), max(0, self._running - self._max)

    def open(self) -> None:
        """Create and start the pool (threads start now; connections open on first use)."""
        if self._pool is not None:
            return
        pool = adbapi.ConnectionPool(
            "psycopg2",
            dsn=self.dsn,
            application_name=self._application_name,
            cp_min=self._min,
            cp_max=self._max,
            cp_reconnect=True,
            cp_noisy=False,
            cp_openfun=_prepare_connection,
            cp_reactor=self._reactor,
        )
        # adbapi starts itself once the reactor runs; we start it now, from our service, so the
        # order against the embedded cluster is ours to choose.  close() undoes both.
        if pool.startID is not None:
            self._reactor.removeSystemEventTrigger(pool.startID)
            pool.startID = None
        pool.start()
        self._pool = pool

    def close(self) -> None:
        """Stop the pool threads and close every connection."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def run(
        self,
        name: str,
        fn: Callable[Concatenate[Cursor, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(cursor, *args, **kwargs)`` in one transaction in a pool thread.

        The transaction commits when ``fn`` returns and rolls back when it raises.  ``name``
        appears in the logs so slow or failing transactions can be told apart.
        """
        if self._pool is None:
            raise DatabaseUnavailable(f"database pool is not open (running {name})")
        started = time.monotonic()
        d: Deferred[T] = self._pool.runInteraction(fn, *args, **kwargs)
        self._running += 1
        try:
            return await d
        except TRANSIENT_ERRORS as e:
            self.log.warn(
                "database transaction {name} failed after {elapsed:.3f}s: {error}",
                name=name,
                elapsed=time.monotonic() - started,
                error=str(e).strip(),
            )
            raise DatabaseUnavailable(f"{name}: {str(e).strip()}") from e
        finally:
            self._running -= 1


def connect(dsn: str, application_name: str = "esp") -> psycopg2.extensions.connection:
    """A plain blocking connection, for the admin CLI and start-up checks (never the reactor)."""
    try:
        connection = psycopg2.connect(dsn, application_name=application_name)
    except TRANSIENT_ERRORS as e:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {str(e).strip()}") from e
    _prepare_connection(connection)
    return connection


def run_sync(
    connection: psycopg2.extensions.connection,
    fn: Callable[Concatenate[Cursor, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run a transaction function synchronously: commit on return, roll back on error."""
    try:
        with connection, connection.cursor() as cur:
            return fn(cur, *args, **kwargs)
    except TRANSIENT_ERRORS as e:
        raise DatabaseUnavailable(str(e).strip()) from e
