"""The service tree: ``makeService(config)`` builds everything ``twistd esp`` and ``esp.tac`` run.

Building only makes objects; every piece of I/O (starting the embedded cluster, opening the pool,
migrating, binding ports) happens in ``startService``.  :class:`ESPService` starts its children
one after another, waiting for each (the database must be up before anything that uses it), and
stops them in reverse order, so SIGTERM closes the pool before the cluster is shut down.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import psycopg2.extensions
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import esp
from esp.api.app import ManagementAPI
from esp.api.base import APIServices
from esp.api.service import api_listeners
from esp.api.tokens import TokenIssuer
from esp.auditlog import AuditLogger
from esp.auth import DirectoryChecker, PasswordHasher
from esp.certs.manager import CertificateManager
from esp.certs.providers import acme_providers, chosen_dns_solver
from esp.certs.responder import challenge_site
from esp.config import Config
from esp.delivery import LocalDelivery
from esp.dns import Resolver
from esp.events import EventBus
from esp.filters import FilterServices
from esp.filters.pipeline import (
    DomainFilterCache,
    FilterPipeline,
    build_stages,
    installed_filters,
)
from esp.imap.service import imap_listeners
from esp.inbound import InboundPolicy, MailAuthPolicy
from esp.indexer import BodyIndexer
from esp.listeners import ListenerService
from esp.mailauth import MailAuthenticator
from esp.metrics import (
    DepthReader,
    Metrics,
    MetricsSubscriber,
    metrics_site,
    multiprocess_dir,
)
from esp.outbound import OutboundService
from esp.rules import Rule
from esp.signing import DKIMSigner
from esp.smtp.service import smtp_listeners
from esp.storage.certificates import CHANNEL as CERTIFICATES_CHANNEL
from esp.storage.certificates import DUE_CHANNEL as CERTIFICATES_DUE_CHANNEL
from esp.storage.cluster import EmbeddedCluster
from esp.storage.db import Database
from esp.storage.directory import DirectoryStore
from esp.storage.dkimkeys import SecretBox
from esp.storage.mailboxes import MailboxStore
from esp.storage.migrations import apply_migrations_txn, load_migrations
from esp.storage.notify import MailboxNotifier
from esp.storage.outbox import CHANNEL as OUTBOX_CHANNEL
from esp.storage.pgasync import AsyncDatabase
from esp.storage.rules import rules_for_txn
from esp.subscribers import chosen_subscribers
from esp.tls import CertificateStore
from esp.ttlcache import TTLCache
from esp.webhooks.dispatcher import WebhookDispatcher
from esp.webhooks.routing import EndpointDirectory, OutboxWriter
from esp.workers import WorkerPool, worker_count


class OrderedMultiService(MultiService):
    """Starts children in order, each after the previous one's start completed; stops in reverse.

    A failed start stops what had started and calls ``on_start_failure``.
    """

    log = Logger()

    def __init__(self, on_start_failure: Callable[[Failure], None] | None = None) -> None:
        super().__init__()
        self._on_start_failure = on_start_failure
        self._starting: Deferred[None] | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start_children())
        self._starting.addErrback(self._start_failed)

    async def _start_children(self) -> None:
        for child in list(self):
            await maybeDeferred(child.startService)
        self.ready.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        if not self.running:
            # stopService cancelled a start still under way: stopping is already in hand.
            if not self.ready.called:
                self.ready.errback(failure)
            return
        self.log.failure("start-up failed", failure)
        Deferred.fromCoroutine(self._stop_children()).addBoth(
            lambda _: self._on_start_failure(failure) if self._on_start_failure else None
        )
        if not self.ready.called:
            self.ready.errback(failure)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        await self._stop_children()

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=child.name)


class ThreadPoolService(Service):
    """A named thread pool that lives exactly as long as the service."""

    def __init__(self, name: str, max_threads: int) -> None:
        self.setName(name)
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class EmbeddedClusterService(Service):
    """Starts the private PostgreSQL cluster (creating it the first time) and stops it.

    The service owns the cluster through its lock for as long as it runs; a CLI command that
    started the cluster meanwhile is waited for.  A stop that arrives during start-up waits for
    the start (which runs in a thread and cannot be interrupted) and then stops the cluster, so
    no PostgreSQL is left behind.
    """

    log = Logger()

    def __init__(
        self, cluster: EmbeddedCluster, reactor: Any, threadpool: ThreadPool, timeout: float
    ) -> None:
        self.setName("embedded-postgresql")
        self.cluster = cluster
        self._reactor = reactor
        self._threadpool = threadpool
        self._timeout = timeout
        self._thread: Deferred[bool] | None = None

    def startService(self) -> Deferred[None]:
        super().startService()
        self._thread = deferToThreadPool(
            self._reactor, self._threadpool, self._own_and_start
        )
        # Hand out a separate Deferred: cancelling it (a stop during start-up) must not make
        # us forget the thread that is still running.
        outer: Deferred[bool] = Deferred()

        def relay(result: bool | Failure) -> bool | Failure:
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            return result

        self._thread.addBoth(relay)
        return outer.addCallback(self._started)

    def _own_and_start(self) -> bool:
        self.cluster.own(self._timeout)
        return self.cluster.start()

    def _started(self, started: bool) -> None:
        self.log.info(
            "embedded PostgreSQL {how} in {directory} (socket {socket})",
            how="started" if started else "already running, reused",
            directory=str(self.cluster.pgdata),
            socket=str(self.cluster.socket_dir),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._thread is not None:
            try:
                await self._thread
            except Exception as e:  # the start failed; whatever did start is stopped below
                self.log.debug("cluster start had failed: {error}", error=str(e))
        self.log.info("stopping embedded PostgreSQL")
        await deferToThreadPool(self._reactor, self._threadpool, self._stop_and_disown)

    def _stop_and_disown(self) -> None:
        try:
            if self.cluster.try_own():
                self.cluster.stop()
        finally:
            self.cluster.disown()


class DatabaseService(Service):
    """Opens the pool and brings the schema up to date; closes the pool on stop."""

    log = Logger()

    def __init__(self, db: Database, fast: AsyncDatabase | None = None) -> None:
        self.setName("database")
        self.db = db
        self._fast = fast

    def startService(self) -> Deferred[None]:
        super().startService()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.db.open()
        migrations = load_migrations()
        applied = await self.db.run("apply_migrations", apply_migrations_txn, migrations)
        if applied:
            self.log.info("schema migrations applied: {versions}", versions=applied)
        self.log.info("database schema at version {version}", version=migrations[-1].version)

    def stopService(self) -> None:
        super().stopService()
        if self._fast is not None:
            self._fast.close()
        self.db.close()


class CertificateService(Service):
    """Loads the TLS certificates while still privileged (keys are often readable by root only)."""

    def __init__(self, store: CertificateStore) -> None:
        self.setName("certificates")
        self.store = store
        self._loaded = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.store.load()
        self._loaded = True

    def startService(self) -> None:
        super().startService()
        if not self._loaded:
            self.store.load()
            self._loaded = True


class SigningKeyService(Service):
    """Reads (or makes) the API's token signing key at start, once the data directory is
    there."""

    def __init__(self, tokens: TokenIssuer) -> None:
        self._tokens = tokens

    def startService(self) -> None:
        super().startService()
        self._tokens.load()


class SpoolService(Service):
    def __init__(self, delivery: LocalDelivery) -> None:
        self.setName("spool")
        self._delivery = delivery

    def startService(self) -> None:
        super().startService()
        self._delivery.prepare()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._delivery.close()


class ReadyAnnouncement(Service):
    """The last child: says that ESP is up and where its pieces are."""

    log = Logger()

    def __init__(
        self, config: Config, database_description: str, listeners: list[ListenerService]
    ) -> None:
        self.setName("ready")
        self._config = config
        self._database = database_description
        self._listeners = listeners

    def startService(self) -> None:
        super().startService()
        for listener in self._listeners:
            self.log.info(
                "{name} listening on {address}", name=listener.name, address=listener.address
            )
        self.log.info(
            "ESP {version} ready: host {hostname}, data {data_dir}, database {database}, "
            "maildir {maildir}",
            version=esp.__version__,
            hostname=self._config.server.hostname,
            data_dir=str(self._config.data_dir),
            database=self._database,
            maildir=str(self._config.maildir_root),
        )


class ESPService(OrderedMultiService):
    """The root of the tree; holds the shared pieces services are built from."""

    def __init__(
        self,
        config: Config,
        db: Database,
        events: EventBus,
        directory: DirectoryStore,
        checker: DirectoryChecker,
        on_start_failure: Callable[[Failure], None] | None = None,
    ) -> None:
        super().__init__(on_start_failure)
        self.setName("esp")
        self.config = config
        self.db = db
        self.events = events
        self.directory = directory
        self.checker = checker
        self.delivery: LocalDelivery | None = None
        self.listeners: list[ListenerService] = []

    def startService(self) -> None:
        _prepare_data_dir(self.config)
        super().startService()


def _prepare_data_dir(config: Config) -> None:
    # 0711 lets the embedded cluster's account (when we run as root) reach <data_dir>/pg
    # without being able to list anything; the Maildir root is private to us.
    config.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.data_dir, 0o711)  # noqa: S103 (traverse only, no listing)
    config.maildir_root.mkdir(mode=0o700, parents=True, exist_ok=True)


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(unparseable DSN)"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))


def exit_after_shutdown(reactor: Any) -> Callable[[Failure], None]:
    """For twistd: a failed start stops the reactor and makes the process exit with status 1."""

    def stop(failure: Failure) -> None:
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return stop


def makeService(
    config: Config,
    reactor: Any = None,
    exit_on_start_failure: bool = False,
    adopted: Mapping[str, tuple[int, int]] | None = None,
    writer: str | None = None,
) -> ESPService:
    """Build the whole service tree from a configuration; nothing is started or opened.

    ``adopted`` is for worker processes: listening sockets inherited from the parent, by
    listener name, instead of binding the configured endpoints; ``writer`` is where they
    reach the parent's Maildir writer.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    blocking = ThreadPoolService("esp-blocking", max_threads=4)
    hashing = ThreadPoolService("esp-password-hashing", max_threads=2)
    disk = ThreadPoolService("esp-disk", max_threads=4)
    dns_pool = ThreadPoolService("esp-dns", max_threads=8)
    certificates = CertificateService(
        CertificateStore(config.security.tls, config.server.hostname, config.data_dir)
    )
    children: list[IService] = [blocking, hashing, disk, dns_pool, certificates]
    if config.embedded_database:
        embedded = config.storage.database.embedded
        cluster = EmbeddedCluster(
            config.data_dir / "pg",
            bin_dir=embedded.bin_dir,
            run_as=embedded.run_as,
            startup_timeout=embedded.startup_timeout,
        )
        children.append(
            EmbeddedClusterService(cluster, reactor, blocking.pool, embedded.startup_timeout)
        )
        dsn = cluster.dsn
        database_description = f"embedded ({cluster.socket_dir})"
    else:
        dsn = config.storage.database.dsn or ""
        database_description = describe_dsn(dsn)
    db = Database(
        dsn,
        reactor,
        min_connections=config.storage.database.pool_min,
        max_connections=config.storage.database.pool_max,
    )
    fast = AsyncDatabase(dsn, reactor, size=4)
    children.append(DatabaseService(db, fast))
    notifier = MailboxNotifier(dsn, reactor)
    children.append(notifier)

    events = EventBus()
    metrics = Metrics(multiprocess_dir(config.data_dir, worker_count(config.server.workers),
                                       worker=adopted is not None))
    events.add_subscriber(MetricsSubscriber(metrics))
    acme_config = config.security.tls.acme
    manager = CertificateManager(
        db, certificates.store, SecretBox(config.dkim_secret_file, create=True), reactor,
        blocking.pool, dsn, events, acme_providers(acme_config), acme_config.provider,
        requested=acme_config.certificates, check_interval=acme_config.check_interval,
        retry_schedule=acme_config.retry_schedule,
        dns_solver=chosen_dns_solver(acme_config.dns_solver, acme_config.dns_solver_settings),
        metrics=metrics,
        # Every process serves the database's certificates; the parent alone orders them.
        issuing=acme_config.enabled and adopted is None)
    notifier.listen(CERTIFICATES_CHANNEL, manager.served_changed)
    notifier.listen(CERTIFICATES_DUE_CHANNEL, manager.work_due)
    children.append(manager)
    directory = DirectoryStore(
        db, config.maildir_root, fast, config.storage.directory_cache_seconds
    )
    checker = DirectoryChecker(
        directory, PasswordHasher(config.security.auth.argon2), reactor, hashing.pool
    )
    workers = worker_count(config.server.workers)
    delivery = LocalDelivery(
        db, config.maildir_root, config.spool_dir, disk.pool, events, reactor, dsn,
        # One Maildir writer per node: every process's deliveries share its group commit.
        share_writer=adopted is None and workers > 1, writer_address=writer,
    )
    children.append(SpoolService(delivery))
    resolver = Resolver(config.server.dns.nameservers, config.server.dns.timeout)
    wake_outbound: Callable[[], None] | None = None
    if config.server.outbound.enabled:
        outbound = OutboundService(
            config.server.outbound, config.server.hostname, db, resolver, dns_pool.pool,
            disk.pool, config.spool_dir, directory, delivery, events, reactor,
        )
        delivery.on_queued = outbound.wake
        children.append(outbound)
        wake_outbound = outbound.wake
    endpoints = EndpointDirectory(db, reactor)
    events.outbox_filter = endpoints.wanted
    events.add_subscriber(OutboxWriter(db, endpoints))
    for subscriber in chosen_subscribers(config.events.subscribers):
        events.add_subscriber(subscriber)
    if config.events.audit.logins:
        events.add_subscriber(AuditLogger(db, config.events.audit.retention_days))
    webhooks = config.events.webhooks
    dispatcher = None
    if webhooks.enabled:
        dispatcher = WebhookDispatcher(
            db, reactor, resolver=resolver, dns_pool=dns_pool.pool,
            allow_networks=webhooks.allow_networks, timeout=webhooks.timeout,
            disable_after=webhooks.disable_after, concurrency=webhooks.concurrency,
            schedule=webhooks.retry_schedule, metrics=metrics)
        notifier.listen(OUTBOX_CHANNEL, dispatcher.wake)
        children.append(dispatcher)
    store = MailboxStore(db, config.maildir_root, disk.pool, reactor)
    body_index = config.storage.body_index
    if body_index.background:
        children.append(BodyIndexer(store, reactor, body_index.interval, body_index.batch,
                                    activity=lambda: delivery.stored))
    mailauth = None
    if config.security.mailauth.enabled:
        mailauth = MailAuthPolicy(
            MailAuthenticator(resolver, config.server.hostname),
            dns_pool.pool,
            reactor,
            enforce_dmarc=config.security.mailauth.enforce_dmarc,
            reject_spf_fail=config.security.mailauth.reject_spf_fail,
        )
    signer = DKIMSigner(db, SecretBox(config.dkim_secret_file), blocking.pool, reactor)
    filter_services = FilterServices(reactor=reactor, db=db, threadpool=blocking.pool,
                                     events=events, hostname=config.server.hostname)
    domain_filters = DomainFilterCache(db, reactor, config.filters.domain_cache_seconds)
    pipeline = FilterPipeline(
        build_stages(config.filters.chain, config.filters.settings, filter_services),
        events, reactor, domain_filters, metrics)
    rules: TTLCache[int, list[Rule]] = TTLCache(
        lambda user_ids: db.run("user_rules", rules_for_txn, user_ids), [], reactor,
        config.filters.rules_cache_seconds)
    policy = InboundPolicy(db, directory, delivery, mailauth, signer, config.server.hostname,
                           pipeline, rules)
    root = ESPService(
        config,
        db=db,
        events=events,
        directory=directory,
        checker=checker,
        on_start_failure=exit_after_shutdown(reactor) if exit_on_start_failure else None,
    )
    listeners = smtp_listeners(
        config.server.smtp,
        hostname=config.server.hostname,
        allow_plaintext_auth=config.security.auth.allow_plaintext_on_loopback,
        policy=policy,
        checker=checker,
        certificates=certificates.store,
        events=events,
        reactor=reactor,
        is_ready=lambda: root.ready.called,
        adopted=adopted,
        metrics=metrics,
    )
    listeners += imap_listeners(
        config.server.imap,
        hostname=config.server.hostname,
        allow_plaintext_auth=config.security.auth.allow_plaintext_on_loopback,
        max_message_size=config.server.smtp.max_message_size,
        store=store,
        delivery=delivery,
        notifier=notifier,
        checker=checker,
        directory=directory,
        certificates=certificates.store,
        events=events,
        reactor=reactor,
        is_ready=lambda: root.ready.called,
        adopted=adopted,
        metrics=metrics,
    )
    if config.server.api.enabled:
        api_config = config.server.api
        tokens = TokenIssuer(
            api_config.signing_key_file or config.data_dir / "api-signing.key",
            api_config.token_lifetime, api_config.refresh_lifetime,
        )
        children.append(SigningKeyService(tokens))
        hasher = PasswordHasher(config.security.auth.argon2)
        api = ManagementAPI(APIServices(
            db=db, checker=checker, tokens=tokens, events=events, reactor=reactor,
            hash_password=lambda password: deferToThreadPool(
                reactor, hashing.pool, hasher.hash, password),
            verify_password=lambda stored, password: deferToThreadPool(
                reactor, hashing.pool, hasher.verify, stored, password),
            maildir_root=config.maildir_root, is_ready=lambda: root.ready.called,
            mailboxes=store, sender=policy, resolver=resolver,
            dkim_box=SecretBox(config.dkim_secret_file, create=True),
            dns_pool=dns_pool.pool, disk_pool=disk.pool, spool_dir=config.spool_dir,
            wake_outbound=wake_outbound, hostname=config.server.hostname,
            max_message_size=config.server.smtp.max_message_size,
            filter_chain=config.filters.chain, filter_factories=installed_filters(),
            forget_domain_filters=domain_filters.forget, forget_rules=rules.forget,
            webhook_networks=webhooks.allow_networks, forget_endpoints=endpoints.forget,
            acme_providers=tuple(acme_config.all_providers()),
            acme_default_provider=acme_config.provider,
        ))
        listeners += api_listeners(
            api_config.listen, api, api_config.max_body, reactor, adopted,
            certificates.store if api_config.tls else None)
    children.extend(listeners)
    if adopted is None and workers > 1:
        for listener in listeners:
            listener.shared = True
        children.append(WorkerPool(config, dsn, listeners, workers - 1, reactor,
                                   on_exit=metrics.process_ended,
                                   writer=lambda: delivery.writer_address))
    announced = list(listeners)
    if config.server.metrics.enabled and adopted is None:
        # In the parent only: a worker's figures are its own (docs/configuration.md).
        for index, description in enumerate(config.server.metrics.listen):
            service = ListenerService(f"metrics-{index}", description, reactor,
                                      lambda: metrics_site(metrics))
            children.append(service)
            announced.append(service)
        children.append(DepthReader(metrics, db, reactor, config.server.metrics.interval))
    elif config.server.metrics.enabled:
        # A worker: its pool's figures, for the parent's listener to add up.
        children.append(DepthReader(metrics, db, reactor, config.server.metrics.interval,
                                    depths=False))
    if acme_config.enabled and adopted is None:
        for index, description in enumerate(acme_config.challenge_listen):
            service = ListenerService(f"acme-http-{index}", description, reactor,
                                      lambda: challenge_site(db))
            children.append(service)
            announced.append(service)
    children.append(ReadyAnnouncement(config, database_description, announced))
    for child in children:
        child.setServiceParent(root)
    root.delivery = delivery
    root.listeners = listeners
    return root
