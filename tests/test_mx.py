"""Where outbound mail goes (RFC 5321 §5.1, RFC 7505), resolved through ESP's one resolver
against a real DNS server with test zones."""

from __future__ import annotations

import pytest

from esp.dns import NoMailHost, Resolver
from tests.dnszone import DNSServer


@pytest.fixture
def resolver(test_dns: DNSServer) -> Resolver:
    return Resolver((test_dns.nameserver,), timeout=5)


def test_mx_hosts_come_in_preference_order(resolver: Resolver) -> None:
    assert resolver.mail_hosts("mx.test") == ["primary.mx.test", "backup.mx.test"]
    assert resolver.addresses("primary.mx.test") == ["127.0.0.1"]


def test_a_domain_without_mx_is_its_own_mail_host(resolver: Resolver) -> None:
    assert resolver.mail_hosts("implicit.test") == ["implicit.test"]


def test_a_null_mx_or_no_host_at_all_takes_no_mail(resolver: Resolver) -> None:
    with pytest.raises(NoMailHost, match="null MX"):
        resolver.mail_hosts("nullmx.test")
    with pytest.raises(NoMailHost, match="no MX and no address"):
        resolver.mail_hosts("nomail.test")
    with pytest.raises(NoMailHost):
        resolver.mail_hosts("nonexistent.nomail.test")
