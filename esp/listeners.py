"""Listening sockets shared by every protocol (SMTP, IMAP, later the API): bound before twistd
drops privileges or adopted from the parent in a worker process, and a protocol that turns
clients away while ESP is still starting."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from esp.prompt import prompt_listening


class NotReady(Protocol):
    """Answers ``line`` and hangs up: the socket is bound early (privileged ports), before the
    rest of ESP can serve."""

    transport: Any

    def __init__(self, line: bytes) -> None:
        self._line = line

    def connectionMade(self) -> None:
        self.transport.write(self._line)
        self.transport.loseConnection()


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
        # Served by several processes (workers): each takes one connection at a time.
        self.shared = adopt is not None
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if self.port is None:  # started without the privileged step (embedded use, tests)
            self._bind()

    def _bind(self) -> None:
        reactor = prompt_listening(self._reactor, one_at_a_time=self.shared)
        if self._adopt is not None:
            fd, family = self._adopt
            self.port = reactor.adoptStreamPort(fd, family, self._build_factory())
            return
        endpoint = endpoints.serverFromString(reactor, self.description)
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


def listener_services(
    label: str,
    descriptions: Sequence[str],
    reactor: Any,
    build: Callable[[], Any],
    adopted: Mapping[str, tuple[int, int]] | None,
) -> list[ListenerService]:
    """One listener per endpoint description, named ``<label>-<index>``; a worker process
    adopts the socket its parent bound under that name instead of binding it again."""
    return [
        ListenerService(f"{label}-{index}", description, reactor, build,
                        adopted.get(f"{label}-{index}") if adopted is not None else None)
        for index, description in enumerate(descriptions)
    ]
