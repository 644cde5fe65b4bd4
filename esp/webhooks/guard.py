"""Where webhooks may go: public addresses, unless an allow-list says otherwise.  A URL is
checked when a webhook is made or changed and again before each connection (a name may
resolve elsewhere by then); redirects are never followed."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from esp.dns import DNSTemporaryError, Resolver

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """The URL leads somewhere webhooks may not go."""


def networks(texts: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def allowed(address: str, allow: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allow):
        return True
    return ip.is_global and not ip.is_multicast


def _addresses(host: str, resolver: Resolver | None) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    if resolver is None:
        raise Refused(f"cannot resolve {host}")
    try:
        addresses = resolver.addresses(host)
    except DNSTemporaryError as e:
        raise Refused(f"cannot resolve {host}: {e}") from None
    if not addresses:
        raise Refused(f"{host} has no address")
    return addresses


def check_url(url: str, allow: Sequence[Network], resolver: Resolver | None) -> list[str]:
    """The addresses ``url``'s host stands for, all of them allowed; Refused otherwise.
    Blocking (DNS): run it in a thread."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError as e:
        raise Refused(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise Refused("only http and https URLs with a host")
    if any(not (c.isalnum() or c in ".-_:[]") for c in host):
        raise Refused(f"{host!r} is not a host name")
    try:
        addresses = _addresses(host, resolver)
    except (ValueError, UnicodeError) as e:  # a name DNS cannot even ask for
        raise Refused(f"cannot resolve {host!r}: {e}") from None
    bad = [a for a in addresses if not allowed(a, allow)]
    if bad:
        raise Refused(f"{host} is {', '.join(bad)}: not a public address (webhooks to it "
                      "need events.webhooks.allow_networks)")
    return addresses
