"""The certificate manager: serves the certificates kept in PostgreSQL (every node, reloaded on
``esp_certificates`` notifications) and issues and renews the ACME ones.

Renewal: a certificate is due once a third of its lifetime is left, or earlier when the CA's
ACME Renewal Information (RFC 9773) suggests it.  The check runs on a timer with jitter and
whenever a request or renewal is notified; one node renews at a time (a PostgreSQL advisory
lock), and re-reads the row under the lock so two nodes never renew the same certificate twice.
A failure keeps the certificate in service, records the error, and waits (``retry_schedule``)
before the next try; it publishes ``certificate.failed``.  Success publishes
``certificate.renewed``, written with the new certificate in one transaction.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from esp.certs import acme
from esp.events import (
    CERTIFICATE_FAILED,
    CERTIFICATE_RENEWED,
    Event,
    EventBus,
    Wants,
    leaving_records,
)
from esp.storage.certificates import (
    CertificateRow,
    NewCertificate,
    due_certificates_txn,
    get_account_txn,
    get_certificate_txn,
    next_due_txn,
    publish_challenge_txn,
    put_account_txn,
    record_failure_txn,
    request_certificate_txn,
    served_certificates_txn,
    store_issued_txn,
    withdraw_challenges_txn,
)
from esp.storage.db import connect, run_sync
from esp.tls import CertificateError, CertificateStore, ServedCertificate

# pg_try_advisory_lock key: one renewal at a time in the cluster.
RENEWAL_LOCK = 0x45_53_50_41  # "ESPA"


@dataclass(frozen=True)
class Outcome:
    names: tuple[str, ...]
    renewed: bool
    error: str | None = None


# However short-lived a certificate (or skewed a clock), never renew one sooner than this.
MIN_RENEWAL_INTERVAL = timedelta(hours=1)


def renewal_time(not_before: datetime, not_after: datetime, now: datetime,
                 suggested: datetime | None = None) -> datetime:
    """When to renew: a third of the lifetime before the end, or the CA's suggestion if
    sooner; never within :data:`MIN_RENEWAL_INTERVAL` of ``now`` (no renewal loops)."""
    third = not_after - (not_after - not_before) / 3
    when = min(third, suggested) if suggested is not None else third
    return max(when, now + MIN_RENEWAL_INTERVAL)


def certificate_facts(served: ServedCertificate) -> dict[str, Any]:
    leaf = served.leaf
    return {"names": list(served.names),
            "not_before": leaf.not_valid_before_utc, "not_after": leaf.not_valid_after_utc,
            "issuer": leaf.issuer.rfc4514_string(), "serial": format(leaf.serial_number, "x")}


class _DatabaseBoard:
    """HTTP-01 answers in the ``acme_challenges`` table (blocking: the issuing thread)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    def publish(self, token: str, key_authorization: str, name: str) -> None:
        with closing(connect(self._dsn, "esp-acme")) as conn:
            run_sync(conn, publish_challenge_txn, token, key_authorization, name)

    def withdraw(self, tokens: Sequence[str]) -> None:
        with closing(connect(self._dsn, "esp-acme")) as conn:
            run_sync(conn, withdraw_challenges_txn, tokens)


class CertificateManager(Service):
    log = Logger()

    def __init__(
        self,
        db: Any,
        store: CertificateStore,
        box: Any,
        reactor: Any,
        threadpool: Any,
        dsn: str,
        events: EventBus,
        providers: Mapping[str, acme.Provider],
        default_provider: str,
        requested: Sequence[Sequence[str]] = (),
        check_interval: float = 43200.0,
        retry_schedule: Sequence[float] = (300, 1800, 7200, 21600, 43200),
        dns_solver: acme.DNSSolver | None = None,
        metrics: Any = None,
        issuing: bool = True,
    ) -> None:
        self.setName("certificate-manager")
        self._db = db
        self._store = store
        self._box = box
        self._reactor = reactor
        self._pool = threadpool
        self._dsn = dsn
        self._events = events
        self._providers = dict(providers)
        self._default_provider = default_provider
        self._requested = [tuple(n) for n in requested]
        self._interval = check_interval
        self._retry = tuple(retry_schedule)
        self._solver = dns_solver
        self._metrics = metrics
        self._issuing = issuing  # False: serve what the database has, never call a CA
        self._timer: IDelayedCall | None = None
        self._checking: Deferred[list[Outcome]] | None = None
        self._again = False
        self._announced = False
        self._reloading = False
        self._reload_wanted = False
        # The clock renewal decisions use (a test moves it forward).
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> Deferred[None]:
        """Serve the database's certificates before the listeners open (ESP's start waits)."""
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(lambda f: self.log.failure("certificate manager start", f))
        return d

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    async def _start(self) -> None:
        try:
            for names in self._requested if self._issuing else ():
                await self._db.run("certificate_request", request_certificate_txn, names,
                                   self._default_provider)
            await self.reload()
        finally:
            if self._issuing:
                self._schedule(random.uniform(1, 10))  # noqa: S311 (jitter, not a secret)

    def served_changed(self) -> None:
        """``esp_certificates`` was notified: reload what is served."""
        Deferred.fromCoroutine(self.reload()).addErrback(
            lambda f: self.log.failure("certificate reload", f))

    def work_due(self) -> None:
        """``esp_certificates_due`` was notified (a request, a renewal asked for)."""
        if self._issuing and self.running:
            self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self._reactor.seconds() <= delay:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self.running:
            return
        d = Deferred.fromCoroutine(self._check_and_plan())
        d.addErrback(lambda f: self.log.failure("certificate check", f))

    async def _check_and_plan(self) -> None:
        # Next look: when the next certificate falls due (a retry after a failure, a renewal),
        # at the latest after the interval, with up to a tenth of jitter so that nodes do not
        # all ask the CA in the same second.
        wait = self._interval * random.uniform(0.9, 1.1)  # noqa: S311
        try:
            await self.check()
            due = await self._db.run("certificates_next_due", next_due_txn)
            if due is not None:
                wait = min(wait, (due - self.now()).total_seconds() + random.uniform(0, 5))  # noqa: S311
        finally:
            if self.running:
                self._schedule(wait)

    # -- serving --------------------------------------------------------------------------------

    async def reload(self) -> int:
        """Install every certificate in the database into the TLS store; how many.  One
        reload at a time; one asked for meanwhile runs once this one is done."""
        self._reload_wanted = True
        if self._reloading:
            return -1
        self._reloading = True
        count = 0
        try:
            while self._reload_wanted:
                self._reload_wanted = False
                count = await self._reload_once()
        finally:
            self._reloading = False
        return count

    async def _reload_once(self) -> int:
        rows = await self._db.run("served_certificates", served_certificates_txn)
        served: list[ServedCertificate] = []
        for certificate_id, names, chain_pem, key_sealed in rows:
            try:
                key_pem = self._box.open(key_sealed, key_context(certificate_id))
                served.append(ServedCertificate.from_pem(chain_pem.encode(), key_pem, names))
            except Exception as e:
                self.log.error("certificate {id} ({name}) cannot be served: {error}",
                               id=certificate_id, name=names[0], error=str(e))
                continue
            if self._metrics is not None:
                self._metrics.certificate_not_after.labels(names[0]).set(
                    served[-1].leaf.not_valid_after_utc.timestamp())
        self._store.install(served)
        if served or self._announced:
            self.log.info("serving {count} certificates from the database", count=len(served))
        self._announced = bool(served)
        return len(served)

    # -- issuing --------------------------------------------------------------------------------

    async def check(self) -> list[Outcome]:
        """Issue or renew every certificate due by :attr:`now`; one check at a time."""
        if self._checking is not None:
            self._again = True
            return await self._checking
        self._checking = Deferred()
        outcomes: list[Outcome] = []
        try:
            while True:
                self._again = False
                due = await self._db.run("certificates_due", due_certificates_txn, self.now())
                for row in due:
                    try:
                        outcomes.append(await self._renew(row))
                    except Exception as e:  # the database away while recording: next check
                        self.log.error("certificate for {name}: {error}", name=row.names[0],
                                       error=str(e))
                        outcomes.append(Outcome(row.names, False, str(e)))
                if not self._again:
                    break
        finally:
            waiting, self._checking = self._checking, None
            waiting.callback(outcomes)
        return outcomes

    async def _renew(self, row: CertificateRow) -> Outcome:
        provider_name = row.provider or self._default_provider
        provider = self._providers.get(provider_name)
        wants = await self._events.leaving()
        when = self.now()
        if provider is None:
            error = f"no ACME provider {provider_name!r} is configured"
            result: _Result | None = await self._db.run(
                "certificate_failed", self._record_failure_txn, row, error, when, wants)
        else:
            result = await deferToThreadPool(self._reactor, self._pool, self._issue_locked,
                                             provider, row, when, wants)
        if result is None:
            return Outcome(row.names, False)  # another node has it, or it is no longer due
        self._events.publish(result.event)
        if result.error is not None:
            self._count("failed")
            self.log.warn("certificate for {names} not issued ({error}); "
                          "{served}, next try in {wait:.0f}s",
                          names=",".join(row.names), error=result.error, wait=result.wait,
                          served="the old one stays in service" if row.chain_pem
                          else "none in service yet")
            return Outcome(row.names, False, result.error)
        self._count("renewed")
        self.log.info("certificate for {names} issued by {provider}, valid until {until}",
                      names=",".join(row.names), provider=provider_name,
                      until=result.event.payload["not_after"])
        await self.reload()  # here at once; the notification reloads the other nodes
        return Outcome(row.names, True)

    def _issue_locked(self, provider: acme.Provider, row: CertificateRow, when: datetime,
                      wants: Wants) -> _Result | None:
        """In a pool thread, under the cluster's renewal lock held until the outcome is
        written: if the row is still due, order the certificate (registering an account first
        if needed) and store it, or record the failure."""
        with closing(connect(self._dsn, "esp-acme")) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (RENEWAL_LOCK,))
                found = cur.fetchone()
            conn.commit()
            if not (found and found[0]):
                return None
            try:
                current = run_sync(conn, get_certificate_txn, row.id)
                if current is None or not _still_due(current, when):
                    return None
                try:
                    chain_pem, key_pem, suggested = self._order(conn, provider, current)
                    served = ServedCertificate.from_pem(chain_pem, key_pem, current.names)
                except (acme.AcmeError, CertificateError) as e:
                    return run_sync(conn, self._record_failure_txn, current, str(e), when,
                                    wants)
                return run_sync(conn, self._store_txn, current, served, chain_pem, key_pem,
                                suggested, provider.name, wants)
            finally:
                conn.rollback()
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (RENEWAL_LOCK,))
                conn.commit()

    def _order(self, conn: Any, provider: acme.Provider,
               row: CertificateRow) -> tuple[bytes, bytes, datetime | None]:
        """The account (stored before anything is ordered with it), then the order."""
        context = account_context(provider.directory)
        stored = run_sync(conn, get_account_txn, provider.directory)
        account = (acme.Account(self._box.open(stored[0], context), stored[1])
                   if stored is not None else None)
        for _ in range(2):
            if account is None:
                account = acme.register(provider)
                run_sync(conn, put_account_txn, provider.directory,
                         self._box.seal(account.key_pem, context), account.url, provider.email)
            try:
                issued = acme.issue(provider, account, row.names, _DatabaseBoard(self._dsn),
                                    self._solver)
            except acme.UnknownAccount:
                account = None  # the CA forgot it (a reset test CA): register again, once
                continue
            suggested = acme.suggested_renewal(provider, account, issued.chain_pem)
            return issued.chain_pem, issued.key_pem, suggested
        raise acme.AcmeError(f"{provider.name} does not know the account it just registered")

    def _store_txn(self, cur: Any, row: CertificateRow, served: ServedCertificate,
                   chain_pem: bytes, key_pem: bytes, suggested: datetime | None,
                   provider: str, wants: Wants) -> _Result:
        facts = certificate_facts(served)
        event = Event(CERTIFICATE_RENEWED, {
            **facts, "not_before": facts["not_before"].isoformat(),
            "not_after": facts["not_after"].isoformat(), "source": "acme",
            "provider": provider}, domain=row.domain)
        new = NewCertificate(
            chain_pem.decode(), self._box.seal(key_pem, key_context(row.id)),
            facts["not_before"], facts["not_after"], facts["issuer"], facts["serial"],
            renewal_time(facts["not_before"], facts["not_after"], self.now(), suggested))
        store_issued_txn(cur, row.id, new, leaving_records([event], wants))
        return _Result(event)

    def _record_failure_txn(self, cur: Any, row: CertificateRow, error: str, when: datetime,
                            wants: Wants) -> _Result:
        attempt = row.failures + 1
        wait = self._retry[min(attempt, len(self._retry)) - 1] if self._retry else 3600.0
        retry_at = when + timedelta(seconds=wait)
        event = Event(CERTIFICATE_FAILED, {
            "names": list(row.names), "error": error, "failures": attempt,
            "retry_at": retry_at.isoformat(), "provider": row.provider,
            "not_after": row.not_after.isoformat() if row.not_after else None},
            domain=row.domain)
        record_failure_txn(cur, row.id, error, retry_at, leaving_records([event], wants))
        return _Result(event, error, wait)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.certificate_renewals.labels(outcome).inc()


@dataclass(frozen=True)
class _Result:
    event: Event
    error: str | None = None
    wait: float = 0.0


def _still_due(row: CertificateRow, when: datetime) -> bool:
    return row.source == "acme" and row.next_attempt_at <= when and (
        row.chain_pem is None or (row.renew_at is not None and row.renew_at <= when))


def key_context(certificate_id: int) -> bytes:
    """What a certificate's key is sealed under: its row."""
    return f"certificate:{certificate_id}".encode()


def account_context(directory: str) -> bytes:
    return f"acme-account:{directory}".encode()
