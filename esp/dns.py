"""The one DNS resolver every lookup of ESP goes through (SPF, DKIM, DMARC, MX).

Nameservers come from configuration (``server.dns``), so tests point ESP at a DNS server with
test zones on loopback and production at a validating local resolver; with none configured the
system's ``/etc/resolv.conf`` is used.  dnspython is blocking: call these methods from a thread.
"""

from __future__ import annotations

import random
from typing import Any

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver


class DNSTemporaryError(Exception):
    """The answer could not be had now (timeout, SERVFAIL): try again later."""


class NoMailHost(Exception):
    """The domain takes no mail: a null MX (RFC 7505), or neither MX nor address (permanent)."""


class Resolver:
    def __init__(self, nameservers: tuple[str, ...] = (), timeout: float = 5.0) -> None:
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            resolver.nameservers = [_nameserver(text) for text in nameservers]
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, 2.0)
        self._resolver = resolver

    def query(self, name: str, rdtype: str) -> list[Any]:
        """Records of ``rdtype`` at ``name``; [] when there are none (NXDOMAIN, NODATA)."""
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DNSTemporaryError(f"{rdtype} {name}: {e}") from e
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{rdtype} {name}: {e}") from e
        return list(answer)

    def mail_hosts(self, domain: str) -> list[str]:
        """Where mail for ``domain`` goes, in the order to try (RFC 5321 §5.1): its MX hosts by
        preference (equal ones in random order, to spread the load), or the domain itself when
        it has no MX but has an address (the implicit MX).  Raises NoMailHost for a null MX or
        a domain with neither, DNSTemporaryError when the answer cannot be had now."""
        records = self.query(domain, "MX")
        if records:
            if any(r.exchange.to_text(omit_final_dot=True) in ("", ".") for r in records):
                raise NoMailHost(f"{domain} accepts no mail (null MX)")
            by_preference: dict[int, list[str]] = {}
            for r in records:
                host = r.exchange.to_text(omit_final_dot=True).lower()
                by_preference.setdefault(r.preference, []).append(host)
            hosts: list[str] = []
            for preference in sorted(by_preference):
                group = by_preference[preference]
                random.shuffle(group)
                hosts.extend(h for h in group if h not in hosts)
            return hosts
        if self.addresses(domain):
            return [domain]
        raise NoMailHost(f"{domain} has no MX and no address")

    def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``host`` ([] when it has none)."""
        return ([r.address for r in self.query(host, "AAAA")]
                + [r.address for r in self.query(host, "A")])

    def txt(self, name: str) -> list[bytes]:
        """TXT records, each with its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    # -- adapters for the libraries that do their own lookups ----------------------------------

    def pyspf_lookup(
        self, name: str, qtype: str, strict: bool = True, timeout: float = 20
    ) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup`` contract."""
        import spf

        try:
            records = self.query(name, qtype)
        except DNSTemporaryError as e:
            raise spf.TempError(f"DNS {e}") from e
        found: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), r.address))
            elif qtype == "MX":
                found.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), r.strings))
        return found

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc`` contract."""
        records = self.txt(name.decode("ascii").rstrip("."))
        return records[0] if records else None


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, port = text, 53
    if text.startswith("["):  # [::1]:5353
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:  # 127.0.0.1:5353
        host, _, port_text = text.partition(":")
        port = int(port_text)
    return dns.nameserver.Do53Nameserver(host, port)
