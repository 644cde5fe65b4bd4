"""The background body indexer: adds newly stored messages to the full-text index
(:mod:`esp.storage.bodyindex`) so that the first ``SEARCH BODY`` of a mailbox after a busy
day does not have to index the whole day's mail itself.

It looks every ``interval`` seconds, and each batch is one transaction in the database pool
(rows are claimed with ``SKIP LOCKED``: every worker process and every node can run one).

Accepting mail comes first.  Indexing reads and parses every file in this process, so a
backlog indexed at full speed while mail pours in took the reactor and PostgreSQL from the
deliveries: with ``bench/smtp_accept.py``'s load it cut the messages accepted per second by up
to a third.  So while this process is storing mail (``activity`` moved since the last pass),
the indexer takes one batch per interval; once a pass finds no new delivery, it goes on batch
after batch while it finds full ones.  A search never waits for it: the first body search of
a mailbox indexes what is left there.  A failed pass is logged and tried again at the next
interval; nothing depends on the indexer for correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from esp.storage.bodyindex import BATCH
from esp.storage.db import DatabaseUnavailable
from esp.storage.mailboxes import MailboxStore


class BodyIndexer(Service):
    log = Logger()

    def __init__(self, store: MailboxStore, reactor: Any, interval: float = 10.0,
                 batch: int = BATCH, activity: Callable[[], int] = lambda: 0) -> None:
        """``activity``: a count that moves whenever this process stores mail (the messages
        it has delivered)."""
        self._store = store
        self._reactor = reactor
        self._interval = interval
        self._batch = batch
        self._activity = activity
        self._seen = activity()
        self._next: IDelayedCall | None = None
        self._pass: Deferred[Any] | None = None
        self.indexed = 0  # messages indexed since start

    @property
    def current_pass(self) -> Deferred[Any] | None:
        """The pass in progress, if any: it fires once the next one is scheduled."""
        return self._pass

    def startService(self) -> None:
        super().startService()
        self._schedule(self._interval)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        return self._pass  # a batch in progress finishes (one transaction)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._next = self._reactor.callLater(delay, self._start_pass)

    def _start_pass(self) -> None:
        self._next = None
        now = self._activity()
        busy, self._seen = now != self._seen, now
        # Kept before its callbacks are added: a pass that ends at once clears it there.
        self._pass = running = Deferred.fromCoroutine(self.run_once())
        running.addBoth(self._passed, busy)

    def _passed(self, found: object, busy: bool) -> None:
        self._pass = None
        # Batch after batch only while no mail is arriving (see the module docstring).
        self._schedule(0 if found == self._batch and not busy else self._interval)

    async def run_once(self) -> int:
        """Index one batch; how many messages it held."""
        try:
            found = await self._store.index_bodies(None, self._batch)
        except DatabaseUnavailable as e:
            self.log.warn("body indexing skipped: {error}", error=str(e))
            return 0
        except Exception:
            self.log.failure("body indexing failed")
            return 0
        self.indexed += found
        return found
