"""The SMTP listeners: MX, submission (STARTTLS) and submissions (implicit TLS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from esp.config import SMTPConfig
from esp.envelope import Listener
from esp.events import EventBus
from esp.limits import ConnectionLimits
from esp.listeners import ListenerService, NotReady, listener_services
from esp.metrics import Metrics
from esp.smtp.server import ESMTPServer, SMTPSettings
from esp.tls import CertificateStore


class SMTPFactory(ServerFactory):
    def __init__(
        self,
        settings: SMTPSettings,
        policy: Any,
        checker: Any,
        certificates: CertificateStore,
        limits: ConnectionLimits,
        events: EventBus,
        clock: Any,
        is_ready: Callable[[], bool],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._policy = policy
        self._checker = checker
        self._certificates = certificates
        self._limits = limits
        self._events = events
        self._clock = clock
        self._is_ready = is_ready

    def buildProtocol(self, addr: Any) -> Protocol:
        if not self._is_ready():
            protocol: Protocol = NotReady(
                b"421 4.3.2 Service not yet available, try again later\r\n"
            )
        else:
            protocol = ESMTPServer(
                self.settings, self._policy, self._checker,
                self._certificates.context_factory(), self._limits, self._events, self._clock,
                self._metrics.count_refusal if self._metrics is not None else None,
            )
        protocol.factory = self
        return protocol


def smtp_listeners(
    config: SMTPConfig,
    hostname: str,
    allow_plaintext_auth: bool,
    policy: Any,
    checker: Any,
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
        metrics.watch_sessions("smtp", limits)
    services: list[ListenerService] = []
    for listener, section in (
        (Listener.MX, config.mx),
        (Listener.SUBMISSION, config.submission),
        (Listener.SUBMISSIONS, config.submissions),
    ):
        settings = SMTPSettings(
            hostname=hostname,
            listener=listener,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            idle_timeout=config.idle_timeout,
            allow_plaintext_auth=allow_plaintext_auth,
        )

        def build(settings: SMTPSettings = settings) -> Any:
            factory = SMTPFactory(
                settings, policy, checker, certificates, limits, events, reactor, is_ready,
                metrics,
            )
            if settings.listener is Listener.SUBMISSIONS:
                return TLSMemoryBIOFactory(certificates.context_factory(), False, factory)
            return factory

        services += listener_services(
            f"smtp-{listener.value}", section.listen, reactor, build, adopted
        )
    return services
