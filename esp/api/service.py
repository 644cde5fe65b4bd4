"""The API's listening sockets: a twisted.web Site over the Klein app, with a bound on request
bodies that holds while they are read (a Content-Length over it is refused before any of the
body is taken; a chunked body is cut off when it passes it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Request, Site

from esp.api.app import ManagementAPI
from esp.listeners import ListenerService
from esp.tls import CertificateStore

_TOO_LARGE = (b'{"error":{"code":"too_large","message":"the request body is too large",'
              b'"details":{}}}')


class LimitedRequest(Request):
    """A request whose body may not pass ``channel.site.max_body`` bytes: 413."""

    _received = 0
    _refused = False

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body", 1 << 20))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        # Before the request line is processed there is no response object to use: the answer
        # is written to the connection as it stands, and the connection closed (the rest of
        # the body is never read).
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(_TOO_LARGE)).encode()
            + b"\r\n\r\n" + _TOO_LARGE
        )
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)


class APISite(Site):
    def __init__(self, resource: Any, max_body: int) -> None:
        super().__init__(resource, requestFactory=LimitedRequest)
        self.max_body = max_body
        self.displayTracebacks = False
        self.noisy = False


def api_listeners(
    listen: tuple[str, ...], api: ManagementAPI, max_body: int, reactor: Any,
    adopted: Mapping[str, tuple[int, int]] | None = None,
    certificates: CertificateStore | None = None,
) -> list[ListenerService]:
    """One listener per endpoint; HTTPS with ``certificates`` when given."""
    services = []
    for index, description in enumerate(listen):
        name = f"api-{index}"

        def build(api: ManagementAPI = api) -> Any:
            site = APISite(api.app.resource(), max_body)
            if certificates is None:
                return site
            return TLSMemoryBIOFactory(certificates.context_factory(), False, site)

        services.append(ListenerService(
            name, description, reactor, build,
            adopt=adopted.get(name) if adopted is not None else None,
        ))
    return services

