"""Outbound delivery: workers that drain the shared queue to other servers (RFC 5321 §5).

One :class:`OutboundService` per process leases due rows (:mod:`esp.storage.queue`, ``FOR
UPDATE SKIP LOCKED``, so nodes share the work), groups them by destination domain, and serves
each destination over a few connections, several messages per connection:

- MX lookup through :mod:`esp.dns` (preference order, implicit MX, null MX → bounce), or the
  configured relay; each host's addresses are tried in turn, a few at most (as Postfix does).
- STARTTLS when offered (or required, by config), then one transaction per message for all its
  recipients in that domain, pipelined when the server allows.
- Each recipient's reply decides: 2xx sent (message.sent), 4xx or a broken connection deferred
  (retried on the schedule from config), 5xx bounced: an RFC 3464 report to the sender and the
  address on the sender domain's suppression list (message.bounced).  What is still deferred
  when the message has been queued too long is bounced too.
- Recipients in hosted domains (a bounce report to a local sender, say) are delivered locally
  without a network hop.

Time comes from ``clock`` (the reactor in production), so tests drive retries by advancing it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esp.addresses import InvalidAddress, parse_address
from esp.batching import Batcher
from esp.config import OutboundConfig, parse_host_port
from esp.delivery import DeliveryFailed, LocalDelivery, LocalRecipient, MailboxFull
from esp.dns import DNSTemporaryError, NoMailHost, Resolver
from esp.dsn import FailedRecipient, delivery_status_notification
from esp.events import MESSAGE_BOUNCED, MESSAGE_SENT, Event, EventBus, leaving_records
from esp.loglines import LineLog
from esp.smtp.client import (
    Reply,
    SMTPClientProtocol,
    SMTPConnectionError,
    TransactionResult,
    connect,
    opportunistic_tls,
)
from esp.storage.db import Database, DatabaseUnavailable
from esp.storage.directory import DirectoryStore, NotHosted, UnknownRecipient, is_hosted_txn
from esp.storage.maildir import Maildir, MaildirError, remove_files
from esp.storage.queue import (
    Attempt,
    Claim,
    Finished,
    LeaseLost,
    Notification,
    RecipientOutcome,
    claim_due_txn,
    final_outcomes,
    finish_many_txn,
    next_due_txn,
    release_txn,
    renew_leases_txn,
    spent_spool_files_txn,
    sync_commits_txn,
)

T = TypeVar("T")

# Postfix's smtp_mx_address_limit and smtp_mx_session_limit: addresses tried per attempt, and
# servers that may be talked to before the attempt is given up.
MAX_ADDRESSES = 5
MAX_SESSIONS = 2
# Seconds the answer to "is this domain hosted here?" is remembered.
HOSTED_CACHE_TIME = 10.0
# Seconds an idle connection is kept for the next message to its destination (Postfix's
# smtp_connection_cache_time_limit).
IDLE_CONNECTION_TIME = 2.0
# Seconds a stopping service gives deliveries under way before it cuts them off.
STOP_GRACE = 10.0
# The spool is swept this often for files no queue row needs (a node that died between
# recording a delivery and removing its file); only files older than SPOOL_GRACE are
# considered, so a submission still writing its rows is never touched.
SWEEP_INTERVAL = 3600.0
SPOOL_GRACE = 3600.0


class DestinationUnavailable(Exception):
    """No server of the destination could be reached or would talk: every recipient gets
    ``outcome``."""

    def __init__(self, outcome: RecipientOutcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


@dataclass
class Connection:
    protocol: SMTPClientProtocol
    host: str  # the MX host name (or relay) it goes to
    address: str
    sent: int = 0


@dataclass
class Destination:
    domain: str
    pending: deque[Claim] = field(default_factory=deque)
    connections: int = 0  # delivery tasks serving it
    # Open connections with nothing to send right now, kept a moment for the next claims
    # (Postfix's connection cache); each with the timer that closes it.
    idle: list[tuple[Connection, IDelayedCall]] = field(default_factory=list)


def _deferred(text: str, status: str, host: str | None = None,
              code: int | None = None) -> RecipientOutcome:
    return RecipientOutcome("deferred", code, text, status, host)


def _bounced(text: str, status: str, host: str | None = None, code: int | None = None,
             hard: bool = False) -> RecipientOutcome:
    return RecipientOutcome("bounced", code, text, status, host, hard)


# Refusals of a recipient that say the address itself is bad (RFC 3463): only these put it on
# the suppression list.  A refusal of the sender, of the content, of our IP (5.7.x), a full
# mailbox (5.2.x) or a size (5.3.x) says nothing lasting about the address.
ADDRESS_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
# Recipients per transaction, as Postfix's smtp_destination_recipient_limit.
RECIPIENTS_PER_TRANSACTION = 50


def outcome_of(reply: Reply, host: str, at_rcpt: bool = False) -> RecipientOutcome:
    """What a reply means for a recipient (``at_rcpt``: the reply to its RCPT)."""
    if reply.positive:
        return RecipientOutcome("sent", reply.code, reply.text, reply.status or "2.0.0", host)
    if reply.temporary:
        return _deferred(reply.text, reply.status or "4.0.0", host, reply.code)
    if reply.code < 500:  # 1xx/3xx where a completion was due: a broken server
        return _deferred(f"unexpected reply {reply.text}", "4.5.0", host, reply.code)
    hard = at_rcpt and (reply.status in ADDRESS_STATUSES
                        or (reply.status is None and reply.code in (550, 551, 553)))
    return _bounced(reply.text, reply.status or "5.0.0", host, reply.code, hard=hard)


def transaction_outcomes(
    recipients: Sequence[str], result: TransactionResult, host: str
) -> dict[str, RecipientOutcome]:
    """Each recipient's outcome from one transaction's replies."""
    if not result.mail.positive:
        return dict.fromkeys(recipients, outcome_of(result.mail, host))
    outcomes: dict[str, RecipientOutcome] = {}
    for address, reply in result.recipients:
        if not reply.positive:
            outcomes[address] = outcome_of(reply, host, at_rcpt=True)
        elif result.data is None:
            # Accepted, but the transaction went no further: nothing was sent.
            outcomes[address] = _deferred("no data was sent", "4.0.0", host)
        elif not result.complete and result.data.code < 400:
            outcomes[address] = _deferred(f"unexpected reply to DATA: {result.data.text}",
                                          "4.5.0", host, result.data.code)
        else:
            outcomes[address] = outcome_of(result.data, host)
    return outcomes


class OutboundService(Service):
    log = Logger()

    def __init__(
        self,
        settings: OutboundConfig,
        hostname: str,
        db: Database,
        resolver: Resolver,
        dns_pool: ThreadPool,
        disk_pool: ThreadPool,
        spool_dir: Path,
        directory: DirectoryStore,
        delivery: LocalDelivery,
        events: EventBus,
        reactor: Any,
        clock: Any = None,
        owner: str | None = None,
    ) -> None:
        self.setName("outbound")
        self.settings = settings
        self.hostname = hostname
        self._helo = settings.helo_name or hostname
        self._db = db
        self._resolver = resolver
        self._dns_pool = dns_pool
        self._disk_pool = disk_pool
        self._spool = Maildir(spool_dir)
        self._directory = directory
        self._delivery = delivery
        self._events = events
        self._reactor = reactor
        self.clock = clock if clock is not None else reactor
        self._own_clock = clock is not None
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._destinations: dict[str, Destination] = {}
        self._held: set[int] = set()  # queue ids leased to us, in hand or under way
        self._connections = 0
        self._tasks: set[Deferred[None]] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._hosted: dict[str, tuple[float, bool]] = {}
        self._bodies: dict[int, bytes] = {}  # spool files read ahead, by queue id
        self._attempts_log = LineLog(self.log, reactor)
        # Spool files of finished messages whose commit may not be durable yet.
        self._spent: list[Path] = []
        self._spent_since = 0.0
        self._protocols: set[SMTPClientProtocol] = set()
        self._timer: IDelayedCall | None = None
        self._passing = False
        self._again = False
        self._renewal: LoopingCall | None = None
        self._sweeper: LoopingCall | None = None
        self._tls = opportunistic_tls()
        self._finisher: Batcher[Attempt, Finished] = Batcher(self._finish_batch, 64, 1)
        # Called with each finished claim's outcome (tests and metrics wait on it).
        self.finished_hooks: list[Callable[[Claim, Finished, dict[str, RecipientOutcome]],
                                           None]] = []

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._renewal = LoopingCall(lambda: Deferred.fromCoroutine(self._renew_leases()))
        self._renewal.clock = self.clock
        self._renewal.start(self.settings.lease_time / 3, now=False).addErrback(
            lambda f: self.log.failure("lease renewal stopped", f)
        )
        self._sweeper = LoopingCall(lambda: Deferred.fromCoroutine(self.sweep_spool()))
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("spool sweeping stopped", f)
        )
        self.wake()

    async def sweep_spool(self, min_age: float = SPOOL_GRACE) -> list[str]:
        """Remove spool files that no queue row needs and that are older than ``min_age``
        seconds; returns their names."""
        try:
            candidates = await self._thread(self._disk_pool, _old_files,
                                            self._spool.path / "new", min_age)
            if not candidates:
                return []
            spent: list[str] = await self._db.run(
                "spool_sweep", spent_spool_files_txn, candidates
            )
            await self._thread(self._disk_pool, remove_files,
                               [self._spool.path / "new" / name for name in spent])
        except (OSError, DatabaseUnavailable) as e:
            self.log.warn("spool sweep failed: {error}", error=str(e))
            return []
        if spent:
            self.log.info("removed {count} spool files no queue entry needed",
                          count=len(spent))
        return spent

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for loop in (self._renewal, self._sweeper):
            if loop is not None and loop.running:
                loop.stop()
        for destination in self._destinations.values():
            for connection, timer in destination.idle:
                if timer.active():
                    timer.cancel()
                _abort(connection.protocol)
            destination.idle.clear()
        waiting = [c.queue_id for d in self._destinations.values() for c in d.pending]
        for destination in self._destinations.values():
            destination.pending.clear()
        await self._release(waiting)
        if self._tasks:
            cutoff = self._reactor.callLater(STOP_GRACE, self._cut_off)
            await DeferredList(list(self._tasks), consumeErrors=True)
            if cutoff.active():
                cutoff.cancel()
        await self.flush_spent()
        self._attempts_log.flush()

    async def _release(self, queue_ids: list[int]) -> None:
        """Give back claimed rows not attempted (stopping)."""
        if not queue_ids:
            return
        try:
            await self._db.run("queue_release", release_txn, self.owner, queue_ids)
        except Exception as e:
            self.log.warn("could not give back {count} queue rows: {error}",
                          count=len(queue_ids), error=str(e))
        self._held.difference_update(queue_ids)
        for queue_id in queue_ids:
            self._bodies.pop(queue_id, None)

    def _cut_off(self) -> None:
        for protocol in list(self._protocols):
            _abort(protocol)

    def wake(self) -> None:
        """Look at the queue now (mail was just queued, or a delivery finished)."""
        if not self.running:
            return
        if self._passing:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(0, self._pass)

    @property
    def busy(self) -> bool:
        """Whether a look at the queue or a delivery is under way."""
        return self._passing or bool(self._held) or bool(self._tasks)

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is :attr:`busy` (at once if nothing is)."""
        waiter: Deferred[None] = Deferred()
        if self.busy:
            self._idle_waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _maybe_idle(self) -> None:
        if self._idle_waiters and not self.busy:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def _sql_now(self) -> datetime | None:
        """The time leases and retries are reckoned by: the database's (None), one clock for
        every node; a test's own clock when it gave one."""
        return self._now() if self._own_clock else None

    # -- claiming ----------------------------------------------------------------------------

    def _pass(self) -> None:
        self._timer = None
        self._passing = True
        Deferred.fromCoroutine(self._claim_and_start()).addErrback(
            lambda f: self.log.failure("queue pass failed", f)
        ).addBoth(self._passed)

    def _passed(self, delay: object) -> None:
        self._passing = False
        if not self.running:
            return
        if self._again:
            self._again = False
            self.wake()
        else:
            wait = delay if isinstance(delay, float) else self.settings.poll_interval
            self._timer = self.clock.callLater(wait, self._pass)
        self._maybe_idle()

    async def _claim_and_start(self) -> float:
        """Claim what is due while there is room; how long until the next look."""
        # Rows in hand beyond the open connections wait for a connection to their destination;
        # a few more than the connections keeps each connection busy with its next message.
        room = 2 * self.settings.max_connections - len(self._held)
        if room <= 0:
            return self.settings.poll_interval
        now = self._sql_now()
        cap = 2 * self.settings.max_connections_per_destination
        busy = [d.domain for d in self._destinations.values()
                if len(d.pending) + d.connections >= cap]
        try:
            claims = await self._db.run(
                "queue_claim", claim_due_txn, self.owner, self.settings.lease_time, room, now,
                self.settings.max_queue_time, sorted(self._held), cap, busy,
            )
        except DatabaseUnavailable as e:
            self.log.warn("cannot look at the queue: {error}", error=str(e))
            return self.settings.poll_interval
        self._held.update(c.queue_id for c in claims)  # renewed from now on
        if claims:
            await self._prefetch(claims)
        if not self.running:
            # Stopped meanwhile: give them back at once rather than let the leases run out.
            await self._release([c.queue_id for c in claims])
            return self.settings.poll_interval
        for claim in claims:
            destination = self._destinations.get(claim.recipient_domain)
            if destination is None:
                destination = self._destinations[claim.recipient_domain] = Destination(
                    claim.recipient_domain
                )
            destination.pending.append(claim)
        self._start_connections()
        if len(claims) == room:
            return self.settings.poll_interval  # full: finished deliveries wake us
        wait = await self._db.run("queue_next_due", next_due_txn, self._sql_now(), self.owner)
        if wait is None:
            return self.settings.poll_interval
        if not claims:
            # Due rows that could not be had (another node is claiming them): no spinning.
            wait = max(wait, 0.05)
        return float(min(max(wait, 0.0), self.settings.poll_interval))

    def _start_connections(self) -> None:
        # First a connection for every destination waiting with none, then more for those
        # with a backlog: a busy domain does not take the slots of the others.
        for first_pass in (True, False):
            for destination in list(self._destinations.values()):
                while (
                    destination.pending
                    and destination.connections < self.settings.max_connections_per_destination
                    and self._connections < self.settings.max_connections
                    and self.running
                    and (destination.connections == 0 if first_pass else (
                        # Another connection only when those open have a backlog: a few
                        # messages go faster one after another over one connection.
                        destination.idle
                        or len(destination.pending) > 2 * destination.connections))
                ):
                    self._start_task(destination)
        for destination in list(self._destinations.values()):
            if not destination.pending and not destination.connections and not destination.idle:
                del self._destinations[destination.domain]

    def _start_task(self, destination: Destination) -> None:
        destination.connections += 1
        self._connections += 1
        task = Deferred.fromCoroutine(self._serve(destination))
        self._tasks.add(task)
        task.addErrback(lambda f: self.log.failure("delivery task failed", f))
        task.addBoth(self._task_done, task)

    def _task_done(self, result: object, task: Deferred[None]) -> None:
        self._tasks.discard(task)
        self._maybe_idle()

    async def _renew_leases(self) -> None:
        if not self._held:
            return
        asked = sorted(self._held)
        try:
            kept: set[int] = set(await self._db.run(
                "queue_renew", renew_leases_txn, self.owner, asked,
                self.settings.lease_time, self._sql_now(),
            ))
        except Exception as e:  # the loop must go on: log, try again
            self.log.warn("cannot renew queue leases: {error}", error=str(e))
            return
        lost = set(asked) - kept
        if lost:
            # Leases that ran out (the database was away too long): another worker may have
            # the rows now.  Drop those not started; one under way will find its lease gone.
            self.log.warn("lost the lease of queue rows {ids}", ids=sorted(lost))
            for destination in self._destinations.values():
                for claim in [c for c in destination.pending if c.queue_id in lost]:
                    destination.pending.remove(claim)
                    self._held.discard(claim.queue_id)
                    self._bodies.pop(claim.queue_id, None)

    # -- one destination ---------------------------------------------------------------------

    async def _serve(self, destination: Destination) -> None:
        """Deliver the destination's claims in hand, over one connection at a time."""
        connection: Connection | None = None
        try:
            try:
                hosted = await self._is_hosted(destination.domain)
            except DatabaseUnavailable as e:
                await self._give_up(destination, _deferred(
                    f"cannot tell whether {destination.domain} is hosted here: {e}", "4.3.0"))
                return
            while destination.pending and self.running:
                claim = destination.pending.popleft()
                used: Connection | None = None
                try:
                    if hosted:
                        outcomes = await self._deliver_locally(claim)
                    else:
                        if connection is not None and (
                            connection.sent >= self.settings.messages_per_connection
                        ):
                            await self._close(connection)
                            connection = None
                        while connection is None and destination.idle:
                            connection, timer = destination.idle.pop()
                            if timer.active():
                                timer.cancel()
                            if not connection.protocol.alive:  # closed by the server
                                self._drop(connection)
                                connection = None
                        if connection is None:
                            try:
                                connection = await self._open(destination.domain)
                            except DestinationUnavailable as e:
                                # The same holds for the others in hand: they wait for
                                # their retry (or bounce, for a null MX).
                                destination.pending.appendleft(claim)
                                await self._give_up(destination, e.outcome)
                                break
                        outcomes, usable = await self._send(connection, claim)
                        used = connection
                        connection.sent += 1
                        if not usable:
                            self._drop(connection)
                            connection = None
                except Exception:
                    self.log.failure("queue {id}: delivery attempt failed", id=claim.queue_id)
                    outcomes = dict.fromkeys(claim.recipients, _deferred(
                        "internal error during the delivery attempt", "4.3.0"))
                    if connection is not None:
                        self._drop(connection)
                        connection = None
                await self._finish(claim, outcomes, used)
        finally:
            if connection is not None:
                self._park(destination, connection)
            destination.connections -= 1
            self._connections -= 1
            self._start_connections()
            self.wake()

    def _park(self, destination: Destination, connection: Connection) -> None:
        """Keep a usable connection a moment for the destination's next claims."""
        idle = sum(len(d.idle) for d in self._destinations.values())
        if (
            not self.running or not connection.protocol.alive
            or connection.sent >= self.settings.messages_per_connection
            or idle >= self.settings.max_connections
        ):
            Deferred.fromCoroutine(self._close(connection))
            return
        timer = self._reactor.callLater(IDLE_CONNECTION_TIME, self._unpark, destination,
                                        connection)
        destination.idle.append((connection, timer))

    def _unpark(self, destination: Destination, connection: Connection) -> None:
        destination.idle[:] = [(c, t) for c, t in destination.idle if c is not connection]
        Deferred.fromCoroutine(self._close(connection))
        if (not destination.pending and not destination.connections and not destination.idle
                and self._destinations.get(destination.domain) is destination):
            del self._destinations[destination.domain]

    async def _is_hosted(self, domain: str) -> bool:
        """Whether ``domain`` is delivered here, remembered for HOSTED_CACHE_TIME seconds."""
        now = self._reactor.seconds()
        cached = self._hosted.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        hosted = bool(await self._db.run("is_hosted", is_hosted_txn, domain))
        if len(self._hosted) > 10_000:
            self._hosted.clear()
        self._hosted[domain] = (now + HOSTED_CACHE_TIME, hosted)
        return hosted

    async def _give_up(self, destination: Destination, outcome: RecipientOutcome) -> None:
        """Every claim in hand for the destination gets ``outcome``."""
        while destination.pending:
            claim = destination.pending.popleft()
            await self._finish(claim, dict.fromkeys(claim.recipients, outcome), None)

    async def _thread(self, pool: ThreadPool, fn: Callable[..., T], *args: Any) -> T:
        return await deferToThreadPool(self._reactor, pool, fn, *args)

    async def _open(self, domain: str) -> Connection:
        """A connection to a server of ``domain`` that has said EHLO (and STARTTLS)."""
        relay = self.settings.relay
        if relay is not None:
            host, port = parse_host_port(relay, 25)
            hosts = [host]
        else:
            port = self.settings.port
            try:
                hosts = await self._thread(self._dns_pool, self._resolver.mail_hosts, domain)
            except NoMailHost as e:
                status = "5.1.10" if "null MX" in str(e) else "5.1.2"
                raise DestinationUnavailable(_bounced(str(e), status)) from None
            except DNSTemporaryError as e:
                raise DestinationUnavailable(
                    _deferred(f"MX lookup of {domain} failed: {e}", "4.4.3")
                ) from None
        errors: list[RecipientOutcome] = []
        tried = sessions = 0
        for host in hosts:
            if tried >= MAX_ADDRESSES or sessions >= MAX_SESSIONS:
                break
            try:
                addresses = await self._addresses(host)
            except DNSTemporaryError as e:
                errors.append(_deferred(f"lookup of {host} failed: {e}", "4.4.3", host))
                continue
            if not addresses:
                errors.append(_deferred(f"{host} has no address", "4.4.4", host))
                continue
            for address in addresses:
                if tried >= MAX_ADDRESSES or sessions >= MAX_SESSIONS:
                    break
                tried += 1
                try:
                    connection = await self._connect(host, address, port)
                except SMTPConnectionError as e:
                    errors.append(_deferred(str(e), "4.4.1", host))
                    continue
                sessions += 1
                protocol = connection.protocol
                try:
                    problem = await self._hello(connection, use_tls=True)
                except SMTPConnectionError as e:
                    problem = _deferred(f"{host}[{address}]: {e}", "4.4.2", host)
                    if protocol.tls and self.settings.tls == "may":
                        # The TLS handshake failed: opportunistic TLS goes on without, as
                        # Postfix does, over a new connection.
                        self.log.info("{host}[{address}]: TLS failed ({error}); trying "
                                      "without", host=host, address=address, error=str(e))
                        self._protocols.discard(protocol)
                        try:
                            connection = await self._plain(host, address, port)
                            return connection
                        except SMTPConnectionError as again:
                            problem = _deferred(f"{host}[{address}]: {again}", "4.4.2", host)
                if problem is None:
                    return connection
                errors.append(problem)
                await self._close(connection)
                if problem.status == "bounced":
                    raise DestinationUnavailable(problem)
        raise DestinationUnavailable(
            errors[-1] if errors else _deferred(f"no server of {domain} to try", "4.4.1")
        )

    async def _connect(self, host: str, address: str, port: int) -> Connection:
        protocol = await connect(
            self._reactor, address, port, self.settings.connect_timeout,
            self.settings.command_timeout, self.settings.data_timeout,
        )
        self._protocols.add(protocol)
        return Connection(protocol, host, address)

    async def _plain(self, host: str, address: str, port: int) -> Connection:
        """A connection without TLS, after a failed handshake (tls: may)."""
        connection = await self._connect(host, address, port)
        try:
            problem = await self._hello(connection, use_tls=False)
        except SMTPConnectionError:
            self._drop(connection)
            raise
        if problem is not None:
            await self._close(connection)
            raise SMTPConnectionError(problem.text)
        return connection

    async def _addresses(self, host: str) -> list[str]:
        if _is_ip(host):
            return [host]
        return await self._thread(self._dns_pool, self._resolver.addresses, host)

    async def _hello(self, connection: Connection, use_tls: bool) -> RecipientOutcome | None:
        """Greeting, EHLO and STARTTLS; what went wrong (None: ready for mail)."""
        protocol, host = connection.protocol, connection.host
        where = f"{host}[{connection.address}]"
        greeting = await protocol.greeting()
        if greeting.code != 220:
            return _deferred(f"{where} refused to talk: {greeting.text}",
                             greeting.status or "4.4.2", host, greeting.code)
        if self._helo.lower() in greeting.lines[0].lower().split()[:1]:
            # RFC 5321 §5.1: an MX that is this server itself would loop the mail.
            return _bounced(f"mail for {host} loops back to myself", "5.4.6", host)
        reply = await protocol.ehlo(self._helo)
        if reply.code != 250:
            return _deferred(f"{where} refused EHLO/HELO: {reply.text}",
                             reply.status or "4.4.2", host, reply.code)
        if use_tls and self.settings.tls != "none" and "STARTTLS" in protocol.extensions:
            reply = await protocol.starttls(self._tls, self._helo)
            if not protocol.tls and reply.code // 100 in (4, 5) and self.settings.tls == "may":
                return None  # STARTTLS refused: the session goes on in plain text
            if reply.code != 250:
                return _deferred(f"{where}: STARTTLS failed: {reply.text}",
                                 reply.status or "4.7.5", host, reply.code)
        elif self.settings.tls == "encrypt":
            return _deferred(f"{where} offers no STARTTLS and TLS is required", "4.7.4", host)
        return None

    async def _send(
        self, connection: Connection, claim: Claim
    ) -> tuple[dict[str, RecipientOutcome], bool]:
        """One message over an open connection: each recipient's outcome, and whether the
        connection can carry another."""
        protocol, host = connection.protocol, connection.host
        try:
            message = await self._read_spool(claim)
        except (OSError, MaildirError) as e:
            self.log.error("queue {id}: cannot read its spool file: {error}",
                           id=claim.queue_id, error=str(e))
            return dict.fromkeys(claim.recipients, _deferred(
                f"the queued message cannot be read: {e}", "4.3.0")), True
        limit = protocol.size_limit()
        if limit is not None and len(message) > limit:
            return dict.fromkeys(claim.recipients, _bounced(
                f"message size {len(message)} exceeds the limit of {host} ({limit})",
                "5.3.4", host)), True
        needs_utf8 = not (claim.sender.isascii() and all(r.isascii() for r in claim.recipients))
        if needs_utf8 and "SMTPUTF8" not in protocol.extensions:
            # RFC 6531 §3.2: an internationalized address cannot go to a server without it.
            return dict.fromkeys(claim.recipients, _bounced(
                f"{host} does not support SMTPUTF8", "5.6.7", host)), True
        outcomes: dict[str, RecipientOutcome] = {}
        recipients = list(claim.recipients)
        for start in range(0, len(recipients), RECIPIENTS_PER_TRANSACTION):
            chunk = recipients[start:start + RECIPIENTS_PER_TRANSACTION]
            try:
                result = await protocol.transaction(claim.sender, chunk, message)
            except SMTPConnectionError as e:
                broken = _deferred(f"{host}[{connection.address}]: {e}", "4.4.2", host)
                outcomes.update({r: broken for r in recipients if r not in outcomes})
                return outcomes, False
            outcomes.update(transaction_outcomes(chunk, result, host))
            if not result.complete:
                try:  # a transaction that ended early: start clean for the next one
                    if (await protocol.reset()).code != 250:
                        raise SMTPConnectionError("RSET refused")
                except SMTPConnectionError as e:
                    broken = _deferred(f"{host}[{connection.address}]: {e}", "4.4.2", host)
                    outcomes.update({r: broken for r in recipients if r not in outcomes})
                    return outcomes, False
        return outcomes, True

    async def _read_spool(self, claim: Claim) -> bytes:
        body = self._bodies.pop(claim.queue_id, None)
        if body is not None:
            return body
        path = self._spool.path / "new" / claim.spool_name
        return await self._thread(self._disk_pool, path.read_bytes)

    async def _prefetch(self, claims: Sequence[Claim]) -> None:
        """Read the small spool files of new claims in one trip to a disk thread (one hand-off
        for many messages); the others are read when their turn comes."""
        paths = {c.queue_id: self._spool.path / "new" / c.spool_name for c in claims}
        try:
            self._bodies.update(await self._thread(self._disk_pool, _read_small, paths))
        except OSError as e:
            self.log.warn("cannot read spool files ahead: {error}", error=str(e))

    def _drop(self, connection: Connection) -> None:
        self._protocols.discard(connection.protocol)
        _abort(connection.protocol)

    async def _close(self, connection: Connection) -> None:
        self._protocols.discard(connection.protocol)
        await connection.protocol.quit()

    # -- hosted recipients -------------------------------------------------------------------

    async def _deliver_locally(self, claim: Claim) -> dict[str, RecipientOutcome]:
        try:
            message = await self._read_spool(claim)
        except (OSError, MaildirError) as e:
            return dict.fromkeys(claim.recipients, _deferred(
                f"the queued message cannot be read: {e}", "4.3.0"))
        outcomes: dict[str, RecipientOutcome] = {}
        local: dict[int, LocalRecipient] = {}
        remote: list[str] = []
        delivered: list[str] = []
        for address in claim.recipients:
            try:
                resolution = await self._directory.resolve_recipient(parse_address(address))
            except (UnknownRecipient, InvalidAddress):
                outcomes[address] = _bounced(f"<{address}>: no such user here", "5.1.1",
                                             self.hostname, 550)
                continue
            except NotHosted:
                outcomes[address] = _deferred(f"{address}: domain no longer hosted here",
                                              "4.3.0")
                continue
            except DatabaseUnavailable as e:
                outcomes[address] = _deferred(str(e), "4.3.0")
                continue
            for user in resolution.users:
                local.setdefault(user.id, LocalRecipient(user.id, user.address, user.maildir))
            remote.extend(resolution.external)
            delivered.append(address)
        if delivered:
            try:
                await self._delivery.deliver(
                    message, claim.sender, list(local.values()), tuple(dict.fromkeys(remote)),
                    event_payload={"queue_id": claim.queue_id},
                )
                ok = RecipientOutcome("sent", 250, "delivered locally", "2.0.0", self.hostname)
                outcomes.update(dict.fromkeys(delivered, ok))
            except MailboxFull as e:
                outcomes.update(dict.fromkeys(delivered, _deferred(str(e), "4.2.2")))
            except DeliveryFailed as e:
                outcomes.update(dict.fromkeys(delivered, _deferred(str(e), "4.3.0")))
        return outcomes

    # -- outcomes ----------------------------------------------------------------------------

    async def _finish(
        self, claim: Claim, outcomes: dict[str, RecipientOutcome],
        connection: Connection | None,
    ) -> None:
        """Record the outcome (with a bounce report for the sender when something bounced),
        then announce it.  Never raises: the claim leaves our hands either way."""
        try:
            await self._record(claim, outcomes, connection)
        except Exception:
            self.log.failure("queue {id}: recording the outcome failed", id=claim.queue_id)
        finally:
            self._held.discard(claim.queue_id)
            self._bodies.pop(claim.queue_id, None)

    async def _record(
        self, claim: Claim, outcomes: dict[str, RecipientOutcome],
        connection: Connection | None,
    ) -> None:
        final = final_outcomes(claim, outcomes)
        bounced = [(a, o) for a, o in final.items() if o.status == "bounced"]
        notification: Notification | None = None
        report_path: Path | None = None
        if bounced and claim.sender:
            try:
                report = await self._report(claim, bounced)
                stored = await self._thread(self._disk_pool, self._spool.deliver, report)
                notification = Notification(stored.name, stored.size, claim.sender)
                report_path = stored.path
            except (OSError, MaildirError) as e:
                # No bounce without its report: what bounced waits for another attempt.
                self.log.error("queue {id}: cannot write its bounce report: {error}",
                               id=claim.queue_id, error=str(e))
                claim = replace(claim, expired=False)
                final = {a: (_deferred(f"bounce report not written: {e}", "4.3.0")
                             if o.status == "bounced" else o) for a, o in final.items()}
        events = self._outcome_events(claim, final, connection)
        try:
            # The events that leave the process are written with the outcome.
            records = leaving_records(events, await self._events.leaving())
            finished = await self._finisher.submit((claim, final, notification, records))
        except Exception as e:  # LeaseLost, DatabaseUnavailable...
            # Not recorded: the row's lease runs out and it is tried again (a remote that
            # accepted may then get the message twice: RFC 5321 §6.1 prefers that to loss).
            self.log.warn("queue {id}: outcome not recorded: {error}", id=claim.queue_id,
                          error=str(e))
            if report_path is not None:
                remove_files([report_path])
            return
        self._held.discard(claim.queue_id)
        for event in events:
            self._events.publish(event)
        # One line per attempt, as Postfix logs (esp.loglines: one event for many).
        self._attempts_log.line(
            f"queue {claim.queue_id}: "
            + ", ".join(f"<{a}> {o.status} {o.text}".strip() for a, o in final.items())
            + f" {finished.status} via {connection.host if connection else '-'}"
            f" (attempt {claim.attempts})"
        )
        for hook in self.finished_hooks:
            hook(claim, finished, final)
        if finished.notification_ids or len(self._held) <= self.settings.max_connections:
            self.wake()  # a report to deliver, or room for more claims: keep them coming

    async def _finish_batch(self, attempts: list[Attempt]) -> list[Finished | BaseException]:
        """Record the outcomes that arrived together in one transaction (group commit).

        These commits do not wait for the WAL flush (``_relaxed_commit``), so the spool files
        of finished messages wait in ``_spent`` until a commit that did wait: PostgreSQL's WAL
        is one stream, so its flush makes every earlier commit durable too.  A batch waits
        for the flush when many files are waiting or the oldest has waited a second; a timer
        sees to the last ones."""
        durable = len(self._spent) >= SPENT_BACKLOG or bool(
            self._spent and self._reactor.seconds() - self._spent_since >= SPENT_DELAY
        )
        waiting = self._take_spent() if durable else []
        try:
            results: list[Finished | LeaseLost] = await self._db.run(
                "queue_finish", finish_many_txn, self.owner, attempts, self._sql_now(),
                self.settings.retry_schedule, durable,
            )
        except Exception:
            self._spent = waiting + self._spent
            raise
        spent = [self._spool.path / "new" / claim.spool_name
                 for (claim, _, _, _), result in zip(attempts, results, strict=True)
                 if isinstance(result, Finished) and result.message_done]
        if durable:
            await self._remove_spent(waiting + spent)
        elif spent:
            if not self._spent:
                self._spent_since = self._reactor.seconds()
                self._reactor.callLater(SPENT_DELAY, self._flush_spent_soon)
            self._spent.extend(spent)
        return list(results)

    def _take_spent(self) -> list[Path]:
        taken, self._spent = self._spent, []
        return taken

    def _flush_spent_soon(self) -> None:
        if self._spent:
            Deferred.fromCoroutine(self.flush_spent())

    async def flush_spent(self) -> None:
        """Make the commits of finished messages durable, then remove their spool files."""
        waiting = self._take_spent()
        if not waiting:
            return
        try:
            await self._db.run("queue_sync", sync_commits_txn)
        except Exception as e:
            self.log.warn("cannot make outcomes durable: {error}", error=str(e))
            self._spent = waiting + self._spent
            return
        await self._remove_spent(waiting)

    async def _remove_spent(self, paths: list[Path]) -> None:
        if not paths:
            return
        try:
            await self._thread(self._disk_pool, remove_files, paths)
        except OSError as e:
            self.log.warn("cannot remove spool files: {error}", error=str(e))
            return
        self.log.info("removed {count} spool files of finished messages", count=len(paths))

    async def _report(
        self, claim: Claim, bounced: list[tuple[str, RecipientOutcome]]
    ) -> bytes:
        try:
            original = await self._read_spool(claim)
        except (OSError, MaildirError):
            original = b""
        failed = [
            FailedRecipient(
                address, outcome.status_code or "5.0.0",
                diagnostic=outcome.text if outcome.code else None,
                remote_mta=outcome.remote_mta if outcome.code else None,
                reason=outcome.text,
            )
            for address, outcome in bounced
        ]
        return delivery_status_notification(
            reporting_mta=self.hostname, sender=claim.sender, recipients=failed,
            original=original, arrival=claim.created_at, queue_id=str(claim.queue_id),
            now=self._now(),
        )

    def _outcome_events(
        self, claim: Claim, final: dict[str, RecipientOutcome], connection: Connection | None
    ) -> list[Event]:
        domain = claim.sender.rpartition("@")[2].lower() or None
        sent = [a for a, o in final.items() if o.status == "sent"]
        events = []
        if sent:
            events.append(Event(MESSAGE_SENT, {
                "queue_id": claim.queue_id, "sender": claim.sender, "recipients": sent,
                "remote_mta": connection.host if connection else self.hostname,
                "tls": bool(connection and connection.protocol.tls),
                "attempts": claim.attempts,
            }, domain=domain))
        for address, outcome in final.items():
            if outcome.status == "bounced":
                events.append(Event(MESSAGE_BOUNCED, {
                    "queue_id": claim.queue_id, "sender": claim.sender, "recipient": address,
                    "status": outcome.status_code, "diagnostic": outcome.text,
                    "remote_mta": outcome.remote_mta, "suppressed": outcome.hard,
                }, domain=domain))
        return events


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _abort(protocol: SMTPClientProtocol) -> None:
    if protocol.transport is not None:
        protocol.transport.abortConnection()  # type: ignore[attr-defined]



# Spool files of finished messages wait for a durable commit at most this long (seconds), or
# until this many wait.
SPENT_DELAY = 1.0
SPENT_BACKLOG = 512
# Spool files up to this size are read ahead with their claim.
PREFETCH_LIMIT = 256 * 1024


def _read_small(paths: dict[int, Path]) -> dict[int, bytes]:
    found = {}
    for queue_id, path in paths.items():
        try:
            if path.stat().st_size <= PREFETCH_LIMIT:
                found[queue_id] = path.read_bytes()
        except FileNotFoundError:
            continue  # reported when its delivery reads it
    return found


def _old_files(directory: Path, min_age: float) -> list[str]:
    cutoff = time.time() - min_age
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return [e.name for e in entries if e.is_file() and e.stat().st_mtime <= cutoff]
