"""Which events leave the process (a webhook wants them), and the subscriber that writes
those of them that describe no database change of their own to the outbox.

The events of :data:`esp.events.RECORDED_WITH_CHANGE` are written by their emitters, in the
transaction of the change (the stored message, the queue update, the expunge, the new
mailbox); ``user.login``, the filters' verdicts and the rest are written here as they are
published."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from esp.events import RECORDED_WITH_CHANGE, Event, Wants, event_record
from esp.interfaces import IEventSubscriber
from esp.storage.outbox import Endpoint, enabled_endpoints_txn, insert_events_txn


class EndpointDirectory:
    """The enabled webhooks, read again at most every ``ttl`` seconds (at once after
    :meth:`forget`, which the API calls when it changes one)."""

    def __init__(self, db: Any, reactor: Any, ttl: float = 5.0) -> None:
        self._db = db
        self._reactor = reactor
        self._ttl = ttl
        self._endpoints: list[Endpoint] = []
        self._until = 0.0
        # Counts forget() calls: a list read while a webhook changed may predate the change
        # (a reading in flight when the API created a webhook used to be kept for ``ttl``
        # seconds, and the new webhook missed the events of those seconds).
        self._changes = 0

    async def wanted(self) -> Wants:
        while (now := self._reactor.seconds()) >= self._until:
            changes = self._changes
            endpoints = await self._db.run("webhook_endpoints", enabled_endpoints_txn)
            if changes == self._changes:
                self._endpoints = endpoints
                self._until = now + self._ttl
        endpoints = self._endpoints

        def wants(event_type: str, domain: str | None) -> bool:
            return any(e.wants(event_type, domain) for e in endpoints)

        return wants

    def forget(self) -> None:
        self._until = 0.0
        self._changes += 1


@implementer(IEventSubscriber)
class OutboxWriter:
    name = "outbox"
    patterns = ("#",)
    log = Logger()

    def __init__(self, db: Any, directory: EndpointDirectory) -> None:
        self._db = db
        self._directory = directory

    def handle(self, event: Event) -> Deferred[None] | None:
        if event.type in RECORDED_WITH_CHANGE:
            # Written with their change.  Answered without a coroutine: this runs for every
            # message delivered, and the bus waits for nothing it is not given.
            return None
        return Deferred.fromCoroutine(self._write(event))

    async def _write(self, event: Event) -> None:
        wants = await self._directory.wanted()
        if wants(event.type, event.domain):
            await self._db.run("outbox_event", insert_events_txn, [event_record(event)])
