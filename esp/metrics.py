"""Prometheus metrics (prometheus-client): counted from the events every part of ESP publishes,
timed where the work is (filters, webhook deliveries), and read from PostgreSQL every
``server.metrics.interval`` seconds for what lives there (queue, outbox).  Served at
``/metrics`` on ``server.metrics.listen``.

With ``server.workers`` above 1 every process writes its figures to files under
``<data_dir>/metrics`` (prometheus-client's multiprocess mode) and the parent's listener shows
their sum: counters and histograms of every process, sessions and pool gauges of the live
ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
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
from esp.limits import ConnectionLimits
from esp.storage.db import Cursor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The instruments, in one registry; in ``multiprocess_dir`` (shared by the processes of
    one node, the parent's exposition sums them) when given."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # Chosen when a metric is made: every metric below writes to files there.
            os.environ[MULTIPROCESS_ENV] = str(multiprocess_dir)
            values.ValueClass = values.get_value_class()
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
        # Read from the database by the parent alone: the most recent reading.
        read: Any = {"multiprocess_mode": "mostrecent"}
        # Of each live process, summed.
        live: Any = {"multiprocess_mode": "livesum"}
        self.queue_depth = Gauge("esp_queue_depth", "Outbound queue entries waiting",
                                 registry=r, **read)
        self.queue_oldest = Gauge("esp_queue_oldest_seconds",
                                  "Age of the oldest waiting queue entry", registry=r, **read)
        self.outbox_pending = Gauge("esp_outbox_pending",
                                    "Events not yet handed to webhooks", registry=r, **read)
        self.webhooks_pending = Gauge("esp_webhook_deliveries_pending",
                                      "Webhook deliveries waiting for an attempt", registry=r,
                                      **read)
        self.db_pool_in_use = Gauge("esp_db_connections_in_use",
                                    "Database pool connections in use", registry=r, **live)
        self.db_waiting = Gauge("esp_db_transactions_waiting",
                                "Transactions waiting for a pool connection", registry=r,
                                **live)
        self.certificate_renewals = Counter(
            "esp_certificate_renewals", "ACME issuances and renewals, by outcome", ["outcome"],
            registry=r)
        self.certificate_not_after = Gauge(
            "esp_certificate_not_after_seconds",
            "Expiry (Unix time) of each certificate served from the database", ["name"],
            registry=r, multiprocess_mode="max")
        self.sessions = Gauge("esp_sessions_open", "Client connections open, by protocol",
                              ["protocol"], registry=r, **live)
        self.rejected = Counter("esp_smtp_rejected",
                                "Senders, recipients and messages refused over SMTP, by stage "
                                "(mail, rcpt, data) and enhanced status code",
                                ["stage", "status"], registry=r)

    def count_refusal(self, stage: str, refusal: Refusal) -> None:
        self.rejected.labels(stage, refusal.status or str(refusal.code)).inc()

    def watch_sessions(self, protocol: str, limits: ConnectionLimits) -> None:
        """The sessions gauge of ``protocol`` follows the connections ``limits`` admits."""
        gauge = self.sessions.labels(protocol)
        gauge.set(limits.open)
        limits.on_change = gauge.inc

    def exposition(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._multiprocess_dir))
        return generate_latest(registry)

    def process_ended(self, pid: int) -> None:
        """A worker process is gone: its live gauges stop counting."""
        if self._multiprocess_dir is not None:
            multiprocess.mark_process_dead(pid, str(self._multiprocess_dir))


def multiprocess_dir(data_dir: Path, workers: int, worker: bool) -> Path | None:
    """Where the processes of this node keep their figures: the parent empties it at start
    and its workers find it in their environment; None with one process."""
    if worker:
        inherited = os.environ.get(MULTIPROCESS_ENV)
        return Path(inherited) if inherited else None
    if workers <= 1:
        return None
    directory = data_dir / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.db"):
        old.unlink()
    return directory


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
    """Every ``interval`` seconds: this process's database pool into the gauges, and with
    ``depths`` (one process of a node) the database's depths."""

    log = Logger()

    def __init__(self, metrics: Metrics, db: Any, reactor: Any, interval: float,
                 depths: bool = True) -> None:
        self.setName("metrics-reader")
        self._m = metrics
        self._db = db
        self._depths = depths
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
        in_use, waiting = self._db.load()
        self._m.db_pool_in_use.set(in_use)
        self._m.db_waiting.set(waiting)
        if not self._depths:
            return
        try:
            depth, oldest, outbox, pending = await self._db.run("metrics_depths", depths_txn)
        except Exception as e:
            self.log.warn("cannot read the queue depths: {error}", error=str(e))
            return
        self._m.queue_depth.set(depth)
        self._m.queue_oldest.set(oldest)
        self._m.outbox_pending.set(outbox)
        self._m.webhooks_pending.set(pending)


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
