"""The SMTP listeners: MX, submission (STARTTLS) and submissions (implicit TLS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from esp.config import SMTPConfig
from esp.envelope import Listener
from esp.events import EventBus
from esp.limits import ConnectionLimits
from esp.smtp.server import ESMTPServer, SMTPSettings
from esp.tls import CertificateStore


class NotReady(Protocol):
    """Answers while ESP is still starting (the socket is bound early for privileged ports)."""

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(b"421 4.3.2 Service not yet available, try again later\r\n")
        self.transport.loseConnection()


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
    ) -> None:
        self.settings = settings
        self._policy = policy
        self._checker = checker
        self._certificates = certificates
        self._limits = limits
        self._events = events
        self._clock = clock
        self._is_ready = is_ready

    def buildProtocol(self, addr: Any) -> Protocol:
        if not self._is_ready():
            protocol: Protocol = NotReady()
        else:
            protocol = ESMTPServer(
                self.settings, self._policy, self._checker,
                self._certificates.context_factory(), self._limits, self._events, self._clock,
            )
        protocol.factory = self
        return protocol


class ListenerService(Service):
    """Binds one endpoint in privilegedStartService (before twistd drops privileges)."""

    log = Logger()

    def __init__(
        self,
        name: str,
        description: str,
        reactor: Any,
        build_factory: Callable[[], Any],
        adopt: tuple[int, int] | None = None,
    ) -> None:
        self.setName(name)
        self.description = description
        self._reactor = reactor
        self._build_factory = build_factory
        # In a worker process: (file descriptor, address family) of the parent's socket.
        self._adopt = adopt
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if self.port is None:  # started without the privileged step (embedded use, tests)
            self._bind()

    def _bind(self) -> None:
        if self._adopt is not None:
            fd, family = self._adopt
            self.port = self._reactor.adoptStreamPort(fd, family, self._build_factory())
            return
        endpoint = endpoints.serverFromString(self._reactor, self.description)
        d = endpoint.listen(self._build_factory())
        failures: list[Any] = []
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    @property
    def address(self) -> str:
        if self.port is None:
            return "(not listening)"
        host: Any = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        return str(getattr(host, "name", host))

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


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
) -> list[ListenerService]:
    limits = ConnectionLimits(
        reactor.seconds,
        max_per_ip=config.connections_per_ip,
        rate_per_minute=config.connection_rate_per_ip,
        auth_failures_per_ip=config.auth_failures_per_ip,
    )
    services = []
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
                settings, policy, checker, certificates, limits, events, reactor, is_ready
            )
            if settings.listener is Listener.SUBMISSIONS:
                return TLSMemoryBIOFactory(certificates.context_factory(), False, factory)
            return factory

        for index, description in enumerate(section.listen):
            name = f"smtp-{listener.value}-{index}"
            adopt = adopted.get(name) if adopted is not None else None
            services.append(ListenerService(name, description, reactor, build, adopt))
    return services
