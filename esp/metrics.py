"""Prometheus metrics (prometheus-client): counted from the events every part of ESP publishes,
timed where the work is (filters, webhook deliveries), and read from PostgreSQL every
``server.metrics.interval`` seconds for what lives there (queue, outbox).  Served at
``/metrics`` on ``server.metrics.listen``.

Each process has its own registry: with ``server.workers`` above 1, the parent's listener
shows the parent's figures (and the database readings, which are the cluster's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from esp.envelope import Refusal
from esp.events import (
    FILTER_MATCHED,
    MESSAGE_BOUNCED,
    MESSAGE_RECEIVED,
    MESSAGE_SENT,
    USER_LOGIN,
    Event,
)
from esp.interfaces import IEventSubscriber
from esp.storage.db import Cursor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The instruments, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("esp_events", "Events published, by type", ["type"], registry=r)
        self.received = Counter("esp_messages_received",
                                "Messages stored in local mailboxes (one per copy)",
                                registry=r)
        self.sent = Counter("esp_messages_sent", "Messages accepted by remote servers",
                            registry=r)
        self.bounced = Counter("esp_messages_bounced", "Recipients that failed for good",
                               registry=r)
        self.logins = Counter("esp_logins", "Logins, by protocol and outcome",
                              ["protocol", "outcome"], registry=r)
        self.verdicts = Counter("esp_filter_verdicts",
                                "Filter verdicts other than accept, by filter and action",
                                ["filter", "action"], registry=r)
        self.filter_seconds = Histogram("esp_filter_seconds", "Time a filter took",
                                        ["filter"], buckets=LATENCY_BUCKETS, registry=r)
        self.filter_failures = Counter("esp_filter_failures",
                                       "Filters that raised or timed out", ["filter"],
                                       registry=r)
        self.webhook_deliveries = Counter("esp_webhook_deliveries",
                                          "Webhook attempts, by outcome", ["outcome"],
                                          registry=r)
        self.webhook_seconds = Histogram("esp_webhook_seconds", "Time a webhook call took",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("esp_queue_depth", "Outbound queue entries waiting",
                                 registry=r)
        self.queue_oldest = Gauge("esp_queue_oldest_seconds",
                                  "Age of the oldest waiting queue entry", registry=r)
        self.outbox_pending = Gauge("esp_outbox_pending",
                                    "Events not yet handed to webhooks", registry=r)
        self.webhooks_pending = Gauge("esp_webhook_deliveries_pending",
                                      "Webhook deliveries waiting for an attempt", registry=r)
        self.db_pool_in_use = Gauge("esp_db_connections_in_use",
                                    "Database pool connections in use", registry=r)
        self.db_waiting = Gauge("esp_db_transactions_waiting",
                                "Transactions waiting for a pool connection", registry=r)
        self.certificate_renewals = Counter(
            "esp_certificate_renewals", "ACME issuances and renewals, by outcome", ["outcome"],
            registry=r)
        self.certificate_not_after = Gauge(
            "esp_certificate_not_after_seconds",
            "Expiry (Unix time) of each certificate served from the database", ["name"],
            registry=r)
        self.sessions = Gauge("esp_sessions_open", "Client connections open, by protocol",
                              ["protocol"], registry=r)
        self.rejected = Counter("esp_smtp_rejected",
                                "Senders, recipients and messages refused over SMTP, by stage "
                                "(mail, rcpt, data) and enhanced status code",
                                ["stage", "status"], registry=r)

    def count_refusal(self, stage: str, refusal: Refusal) -> None:
        self.rejected.labels(stage, refusal.status or str(refusal.code)).inc()

    def watch_sessions(self, protocol: str, count: Callable[[], float]) -> None:
        """The sessions gauge of ``protocol`` reads ``count`` at each scrape."""
        self.sessions.labels(protocol).set_function(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@implementer(IEventSubscriber)
class MetricsSubscriber:
    name = "metrics"
    patterns = ("#",)

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def handle(self, event: Event) -> None:
        m = self._m
        m.events.labels(event.type).inc()
        payload = event.payload
        if event.type == MESSAGE_RECEIVED:
            m.received.inc()
        elif event.type == MESSAGE_SENT:
            m.sent.inc()
        elif event.type == MESSAGE_BOUNCED:
            m.bounced.inc()
        elif event.type == USER_LOGIN:
            m.logins.labels(str(payload.get("protocol", "")),
                            "success" if payload.get("success") else "failure").inc()
        elif event.type == FILTER_MATCHED:
            m.verdicts.labels(str(payload.get("filter", "")),
                              str(payload.get("action", ""))).inc()


def depths_txn(cur: Cursor) -> tuple[int, float, int, int]:
    cur.execute(
        """
        SELECT (SELECT count(*) FROM queue WHERE status IN ('queued', 'delivering')),
               coalesce((SELECT extract(epoch FROM now() - min(created_at)) FROM queue
                         WHERE status IN ('queued', 'delivering')), 0),
               (SELECT count(*) FROM event_outbox WHERE dispatched_at IS NULL),
               (SELECT count(*) FROM webhook_deliveries WHERE status IN ('pending',
                                                                        'delivering'))
        """)
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1]), int(row[2]), int(row[3])


class DepthReader(Service):
    """Reads the database's depths every ``interval`` seconds into the gauges."""

    log = Logger()

    def __init__(self, metrics: Metrics, db: Any, reactor: Any, interval: float) -> None:
        self.setName("metrics-reader")
        self._m = metrics
        self._db = db
        self._loop = LoopingCall(self._read)
        self._loop.clock = reactor
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("metrics reader stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _read(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._once())

    async def _once(self) -> None:
        try:
            depth, oldest, outbox, pending = await self._db.run("metrics_depths", depths_txn)
        except Exception as e:
            self.log.warn("cannot read the queue depths: {error}", error=str(e))
            return
        self._m.queue_depth.set(depth)
        self._m.queue_oldest.set(oldest)
        self._m.outbox_pending.set(outbox)
        self._m.webhooks_pending.set(pending)
        in_use, waiting = self._db.load()
        self._m.db_pool_in_use.set(in_use)
        self._m.db_waiting.set(waiting)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.exposition()


def metrics_site(metrics: Metrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    site = Site(root)
    site.noisy = False
    return site
