"""The webhook dispatcher: outbox rows become deliveries (one per webhook that wants the
event), deliveries become signed POSTs with treq, and every attempt is recorded.

Any number of dispatchers (nodes, worker processes) share the work: outbox rows and due
deliveries are taken with ``FOR UPDATE SKIP LOCKED``, deliveries under a lease that runs out
if a dispatcher dies.  Delivery is at least once, with a stable ``webhook-id`` (the event's
id): a receiver that answered but whose answer was lost sees the same id again.  A commit
that writes events notifies ``esp_events`` and wakes the dispatchers; a timer wakes them for
retries (and, as a safety net, every ``poll_interval``).

Retries: about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h after each failure, then the delivery
gives up.  A 410 answer disables the webhook at once; ``disable_after`` deliveries in a row
that gave up disable it too.  Redirects are not followed (a 3xx is a failure).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from esp.events import EventBus, webhook_body
from esp.storage.db import Database, DatabaseUnavailable
from esp.storage.outbox import (
    AttemptOutcome,
    DueDelivery,
    claim_deliveries_txn,
    fan_out_txn,
    finish_attempts_txn,
    next_due_txn,
)
from esp.webhooks import guard, signing

RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
SNIPPET = 500


def body_of(delivery: DueDelivery) -> bytes:
    """The JSON body (its payload as the outbox keeps it: the node included)."""
    body = webhook_body(delivery.event_type, delivery.occurred_at, delivery.event_id,
                        delivery.domain, delivery.actor, delivery.payload)
    return json.dumps(body, separators=(",", ":"), default=str).encode()


class WebhookDispatcher(Service):
    log = Logger()

    def __init__(
        self, db: Database, reactor: Any, *, resolver: Any, dns_pool: Any,
        allow_networks: Sequence[str] = (), timeout: float = 10.0, lease: float = 120.0,
        disable_after: int = 10, concurrency: int = 16, poll_interval: float = 60.0,
        schedule: Sequence[float] = RETRY_SCHEDULE, events: EventBus | None = None,
        metrics: Any = None,
    ) -> None:
        self._metrics = metrics  # esp.metrics.Metrics
        self.setName("webhooks")
        self._db = db
        self._reactor = reactor
        self._resolver = resolver
        self._dns_pool = dns_pool
        self._allow = guard.networks(allow_networks)
        self._timeout = timeout
        self._lease = lease
        self._disable_after = disable_after
        self._concurrency = concurrency
        self._poll = poll_interval
        self._schedule = tuple(schedule)
        self._events = events
        self.owner = f"webhooks-{uuid.uuid4().hex[:12]}"
        self._timer: Any = None
        self._passing = False
        self._again = False
        self.on_pass: Callable[[], None] | None = None  # tests: told after each pass

    # -- waking -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.wake()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def wake(self) -> None:
        """Look now (events were written, or a webhook was changed)."""
        if not self.running:
            return
        if self._passing:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._reactor.callLater(0, self._pass)

    def _pass(self) -> None:
        self._timer = None
        self._passing = True
        Deferred.fromCoroutine(self._work()).addErrback(self._failed).addBoth(self._passed)

    def _failed(self, failure: Any) -> float:
        self.log.failure("webhook pass failed", failure)
        return self._poll

    def _passed(self, wait: object) -> None:
        self._passing = False
        if self.on_pass is not None:
            self.on_pass()
        if not self.running:
            return
        if self._again:
            self._again = False
            self.wake()
            return
        delay = wait if isinstance(wait, float) else self._poll
        self._timer = self._reactor.callLater(delay, self._pass)

    # -- one pass -----------------------------------------------------------------------------

    async def _work(self) -> float:
        """Fan out new events, attempt what is due; seconds until the next look."""
        try:
            while await self._db.run("webhook_fan_out", fan_out_txn) == 500:
                pass
            claimed = await self._db.run("webhook_claim", claim_deliveries_txn, self.owner,
                                         self._lease, self._concurrency)
        except DatabaseUnavailable as e:
            self.log.warn("cannot reach the outbox: {error}", error=str(e))
            return self._poll
        if claimed:
            results = await DeferredList(
                [Deferred.fromCoroutine(self._attempt(d)) for d in claimed],
                consumeErrors=True)
            outcomes = [r for ok, r in results if ok]
            if self._metrics is not None:
                for o in outcomes:
                    kind = ("delivered" if o.delivered else "gone" if o.gone
                            else "no_answer" if o.status is None else "refused")
                    self._metrics.webhook_deliveries.labels(kind).inc()
                    self._metrics.webhook_seconds.observe(o.latency_ms / 1000)
            for o in outcomes:
                if o.delivered:
                    self.log.info("webhook delivery {id} delivered ({status}, {ms} ms)",
                                  id=o.delivery_id, status=o.status, ms=o.latency_ms)
                else:
                    self.log.info(
                        "webhook delivery {id} failed ({error}); {next}", id=o.delivery_id,
                        error=o.error,
                        next="giving up" if o.retry_in is None or o.gone
                        else f"next try in {o.retry_in:g}s")
            disabled = await self._db.run("webhook_finish", finish_attempts_txn, self.owner,
                                          outcomes, self._disable_after)
            for webhook_id in disabled:
                self.log.warn("webhook {id} disabled", id=webhook_id)
            return 0.0  # more may be due
        wait = await self._db.run("webhook_next_due", next_due_txn)
        return self._poll if wait is None else float(min(max(wait, 0.05), self._poll))

    async def _attempt(self, delivery: DueDelivery) -> AttemptOutcome:
        body = body_of(delivery)
        started = time.monotonic()

        def outcome(status: int | None, error: str | None, response: str = "",
                    delivered: bool = False) -> AttemptOutcome:
            gone = status == 410
            retry = (None if delivery.attempts >= len(self._schedule)
                     else float(self._schedule[delivery.attempts]))
            return AttemptOutcome(delivery.id, status, error,
                                  int((time.monotonic() - started) * 1000), response[:SNIPPET],
                                  delivered, gone, retry)

        try:
            await deferToThreadPool(self._reactor, self._dns_pool, guard.check_url,
                                    delivery.url, self._allow, self._resolver)
        except guard.Refused as e:
            return outcome(None, f"refused: {e}")
        timestamp = int(self._reactor.seconds())
        try:
            response = await treq.post(
                delivery.url, data=body,
                headers=signing.headers(delivery.secrets, delivery.event_id, timestamp, body),
                timeout=self._timeout, allow_redirects=False, reactor=self._reactor)
            content = await response.content()
        except Exception as e:
            return outcome(None, str(e) or type(e).__name__)
        text = content.decode("utf-8", "replace")
        if 200 <= response.code < 300:
            return outcome(response.code, None, text, delivered=True)
        return outcome(response.code, f"HTTP {response.code}", text)

