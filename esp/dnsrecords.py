"""The DNS records a hosted domain should publish (MX, SPF, DKIM, DMARC), and what DNS says
about each of them today."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esp.dns import DNSTemporaryError, Resolver
from esp.storage.dkimkeys import DKIMKey


@dataclass(frozen=True)
class Expected:
    type: str  # MX or TXT
    name: str
    value: str
    purpose: str


@dataclass(frozen=True)
class Checked:
    record: Expected
    status: str  # ok, missing, different, unchecked
    found: tuple[str, ...]


def expected_records(domain: str, hostname: str, keys: Sequence[DKIMKey]) -> list[Expected]:
    records = [
        Expected("MX", domain, f"10 {hostname}.", "mail for the domain comes to this server"),
        Expected("TXT", domain, "v=spf1 mx ~all",
                 "SPF: the domain's MX hosts send its mail"),
    ]
    records += [
        Expected("TXT", key.dns_name, key.dns_value, f"DKIM key {key.selector} ({key.algorithm})")
        for key in keys if key.active
    ]
    records.append(Expected(
        "TXT", f"_dmarc.{domain}", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
        "DMARC: what receivers do with mail that fails SPF and DKIM alignment"))
    return records


def _mx(resolver: Resolver, name: str) -> list[str]:
    return [f"{r.preference} {r.exchange.to_text().lower()}" for r in resolver.query(name, "MX")]


def _txt(resolver: Resolver, name: str) -> list[str]:
    return [value.decode("utf-8", "replace") for value in resolver.txt(name)]


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        key, _, value = part.partition("=")
        tags[key.strip().lower()] = "".join(value.split())
    return tags


def _status(record: Expected, found: list[str]) -> str:
    if record.type == "MX":
        hosts = {f.split()[-1].rstrip(".") for f in found}
        return "ok" if record.value.split()[-1].rstrip(".") in hosts else (
            "different" if found else "missing")
    if record.name.startswith("_dmarc."):
        policies = [f for f in found if f.lower().startswith("v=dmarc1")]
        return "ok" if len(policies) == 1 else ("different" if policies else "missing")
    if "._domainkey." in record.name:
        want = _tags(record.value).get("p")
        keys = [_tags(f).get("p") for f in found if "p=" in f]
        return "ok" if want in keys else ("different" if found else "missing")
    spf = [f for f in found if f.lower().startswith("v=spf1")]
    if not spf:
        return "missing"
    return "ok" if len(spf) == 1 and spf[0].split() == record.value.split() else "different"


def check_records(resolver: Resolver, records: Sequence[Expected]) -> list[Checked]:
    """Ask DNS about each record (blocking: run it in a thread)."""
    checked = []
    for record in records:
        try:
            found = (_mx if record.type == "MX" else _txt)(resolver, record.name)
        except DNSTemporaryError:
            checked.append(Checked(record, "unchecked", ()))
            continue
        checked.append(Checked(record, _status(record, found), tuple(found)))
    return checked
