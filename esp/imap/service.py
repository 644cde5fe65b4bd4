"""The IMAP listeners: 143 (STARTTLS) and 993 (implicit TLS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from esp.config import IMAPConfig
from esp.delivery import LocalDelivery
from esp.events import EventBus
from esp.imap.idle import IdleWaker
from esp.imap.server import IMAPServer, IMAPSettings
from esp.limits import ConnectionLimits, SessionCounter
from esp.listeners import ListenerService, NotReady, listener_services
from esp.metrics import Metrics
from esp.storage.mailboxes import MailboxStore
from esp.storage.notify import MailboxNotifier
from esp.tls import CertificateStore


class IMAPFactory(ServerFactory):
    def __init__(
        self,
        settings: IMAPSettings,
        store: MailboxStore,
        delivery: LocalDelivery,
        notifier: MailboxNotifier,
        checker: Any,
        directory: Any,
        certificates: CertificateStore,
        events: EventBus,
        clock: Any,
        is_ready: Callable[[], bool],
        limits: ConnectionLimits,
        sessions: SessionCounter,
        waker: IdleWaker,
    ) -> None:
        self.settings = settings
        self.waker = waker
        self.limits = limits
        self.sessions = sessions
        self._store = store
        self._delivery = delivery
        self._notifier = notifier
        self._checker = checker
        self._directory = directory
        self._certificates = certificates
        self._events = events
        self._clock = clock
        self._is_ready = is_ready

    def buildProtocol(self, addr: Any) -> Protocol:
        if not self._is_ready():
            protocol: Protocol = NotReady(
                b"* BYE Service not yet available, try again later\r\n"
            )
        else:
            protocol = IMAPServer(
                self.settings, self._store, self._delivery, self._notifier, self._checker,
                self._directory,
                None if self.settings.implicit_tls else self._certificates.context_factory(),
                self._events, self._clock, self.limits, self.sessions, self.waker,
            )
        protocol.factory = self
        return protocol


def imap_listeners(
    config: IMAPConfig,
    hostname: str,
    allow_plaintext_auth: bool,
    max_message_size: int,
    store: MailboxStore,
    delivery: LocalDelivery,
    notifier: MailboxNotifier,
    checker: Any,
    directory: Any,
    certificates: CertificateStore,
    events: EventBus,
    reactor: Any,
    is_ready: Callable[[], bool],
    adopted: Mapping[str, tuple[int, int]] | None = None,
    metrics: Metrics | None = None,
) -> list[ListenerService]:
    limits = ConnectionLimits(
        reactor.seconds,
        max_per_ip=config.connections_per_ip,
        rate_per_minute=config.connection_rate_per_ip,
        auth_failures_per_ip=config.auth_failures_per_ip,
    )
    if metrics is not None:
        metrics.watch_sessions("imap", limits)
    sessions = SessionCounter(config.sessions_per_user)
    waker = IdleWaker(store, notifier, reactor)
    services: list[ListenerService] = []
    for implicit_tls, descriptions, label in ((False, config.listen, "imap"),
                                              (True, config.listen_tls, "imaps")):
        settings = IMAPSettings(
            hostname=hostname,
            implicit_tls=implicit_tls,
            allow_plaintext_auth=allow_plaintext_auth,
            idle_timeout=config.idle_timeout,
            idle_keepalive=config.idle_keepalive,
            max_message_size=max_message_size,
        )

        def build(settings: IMAPSettings = settings) -> Any:
            factory = IMAPFactory(settings, store, delivery, notifier, checker, directory,
                                  certificates, events, reactor, is_ready, limits, sessions,
                                  waker)
            if settings.implicit_tls:
                return TLSMemoryBIOFactory(certificates.context_factory(), False, factory)
            return factory

        services += listener_services(label, descriptions, reactor, build, adopted)
    return services
