"""Sender authentication on the MX: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489), and the
``Authentication-Results`` header that reports them (RFC 8601).

SPF is evaluated at MAIL FROM, DKIM and DMARC after DATA.  Every lookup goes through
:class:`esp.dns.Resolver`.  The checks block (pyspf, dkimpy): callers run them in a thread.
"""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass, field

import dkim
import spf
from publicsuffixlist import PublicSuffixList

from esp.dns import DNSTemporaryError, Resolver
from esp.message import split_header

_psl: PublicSuffixList | None = None


def organizational_domain(domain: str) -> str:
    """The registrable domain under the public suffix list (RFC 7489 §3.2)."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    return _psl.privatesuffix(domain.lower().rstrip(".")) or domain.lower()


@dataclass(frozen=True)
class SPFResult:
    result: str  # pass fail softfail neutral none temperror permerror
    domain: str  # the MAIL FROM domain (or the HELO name for a null sender)
    mailfrom: str
    explanation: str = ""


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass fail neutral temperror permerror
    domain: str = ""
    selector: str = ""
    b: str = ""


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = "none"  # the published p= (or sp=) policy
    disposition: str = "none"  # what we apply: none, quarantine, reject


@dataclass(frozen=True)
class Verdict:
    spf: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult
    header: bytes = field(repr=False, default=b"")


class MailAuthenticator:
    def __init__(self, resolver: Resolver, authserv_id: str) -> None:
        self._resolver = resolver
        self.authserv_id = authserv_id
        # pyspf looks its resolver up as a module global at call time; ESP has one resolver
        # per process, so it is installed once here.
        spf.DNSLookup = resolver.pyspf_lookup

    # -- SPF ----------------------------------------------------------------------------------

    def check_spf(self, client_ip: str, helo: str, mailfrom: str) -> SPFResult:
        domain = mailfrom.rpartition("@")[2] if mailfrom else helo
        sender = mailfrom or f"postmaster@{helo}"
        try:
            result, explanation = spf.check2(i=client_ip, s=sender, h=helo, timeout=20)
        except (spf.TempError, DNSTemporaryError) as e:
            return SPFResult("temperror", domain, mailfrom, str(e))
        except spf.PermError as e:
            return SPFResult("permerror", domain, mailfrom, str(e))
        return SPFResult(result, domain, mailfrom, explanation)

    # -- DKIM and DMARC -----------------------------------------------------------------------

    def verify(self, message: bytes, spf_result: SPFResult) -> Verdict:
        dkim_results = self._check_dkim(message)
        dmarc = self._check_dmarc(message, spf_result, dkim_results)
        return Verdict(spf_result, dkim_results, dmarc, self._header(spf_result, dkim_results,
                                                                        dmarc, message))

    def _check_dkim(self, message: bytes) -> tuple[DKIMResult, ...]:
        header, _ = split_header(message)
        count = len(re.findall(rb"(?im)^dkim-signature:", header))
        results = []
        for index in range(count):
            checker = dkim.DKIM(message)
            try:
                ok = checker.verify(idx=index, dnsfunc=self._resolver.dkim_txt)
            except DNSTemporaryError:
                results.append(DKIMResult("temperror"))
                continue
            except dkim.DKIMException:
                ok = False
            domain = (checker.domain or b"").decode("ascii", "replace").lower()
            selector = (checker.selector or b"").decode("ascii", "replace")
            signature = checker.signature_fields.get(b"b", b"") if checker.signature_fields else b""
            b_tag = re.sub(rb"\s", b"", signature)[:8].decode("ascii", "replace")
            results.append(DKIMResult("pass" if ok else "fail", domain, selector, b_tag))
        return tuple(results)

    def _check_dmarc(
        self, message: bytes, spf_result: SPFResult, dkim_results: tuple[DKIMResult, ...]
    ) -> DMARCResult:
        from_domain = _from_domain(message)
        if from_domain is None:
            # RFC 7489 §6.6.1: without exactly one author domain there is nothing to align with.
            return DMARCResult("permerror")
        try:
            record, is_org = self._dmarc_record(from_domain)
        except DNSTemporaryError:
            return DMARCResult("temperror", from_domain)
        if record is None:
            return DMARCResult("none", from_domain)
        policy = record.get("p", "none").lower()
        if is_org and "sp" in record:
            policy = record["sp"].lower()
        if policy not in ("none", "quarantine", "reject"):
            policy = "none"
        org = organizational_domain(from_domain)

        def aligned(domain: str, mode: str) -> bool:
            domain = domain.lower()
            if mode == "s":
                return domain == from_domain
            return organizational_domain(domain) == org

        spf_aligned = spf_result.result == "pass" and aligned(
            spf_result.domain, record.get("aspf", "r").lower()
        )
        dkim_aligned = any(
            d.result == "pass" and aligned(d.domain, record.get("adkim", "r").lower())
            for d in dkim_results
        )
        if spf_aligned or dkim_aligned:
            return DMARCResult("pass", from_domain, policy, "none")
        disposition = policy
        try:
            pct = int(record.get("pct", "100"))
        except ValueError:
            pct = 100
        if disposition != "none" and random.randrange(100) >= pct:  # noqa: S311 (sampling)
            disposition = "quarantine" if disposition == "reject" else "none"
        return DMARCResult("fail", from_domain, policy, disposition)

    def _dmarc_record(self, domain: str) -> tuple[dict[str, str] | None, bool]:
        record = self._find_dmarc(domain)
        if record is not None:
            return record, False
        org = organizational_domain(domain)
        if org != domain:
            return self._find_dmarc(org), True
        return None, False

    def _find_dmarc(self, domain: str) -> dict[str, str] | None:
        records = [
            r for r in self._resolver.txt(f"_dmarc.{domain}") if r.lower().startswith(b"v=dmarc1")
        ]
        if len(records) != 1:
            return None  # RFC 7489 §6.6.3: none, or more than one, means no policy
        tags = {}
        for part in records[0].decode("ascii", "replace").split(";"):
            key, eq, value = part.strip().partition("=")
            if eq:
                tags[key.strip().lower()] = value.strip()
        return tags

    # -- the header ---------------------------------------------------------------------------

    def _header(
        self,
        spf_result: SPFResult,
        dkim_results: tuple[DKIMResult, ...],
        dmarc: DMARCResult,
        message: bytes,
    ) -> bytes:
        mailfrom = spf_result.mailfrom or spf_result.domain
        parts = [f"spf={spf_result.result} smtp.mailfrom={_value(mailfrom)}"]
        if not dkim_results:
            parts.append("dkim=none")
        for d in dkim_results:
            text = f"dkim={d.result}"
            if d.domain:
                text += f" header.d={_value(d.domain)} header.s={_value(d.selector)}"
            if d.b:
                text += f" header.b={_value(d.b)}"
            parts.append(text)
        dmarc_text = f"dmarc={dmarc.result}"
        if dmarc.result in ("pass", "fail"):
            dmarc_text += f" (p={dmarc.policy} dis={dmarc.disposition})"
        if dmarc.from_domain:
            dmarc_text += f" header.from={_value(dmarc.from_domain)}"
        parts.append(dmarc_text)
        return (
            f"Authentication-Results: {self.authserv_id};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"
        ).encode("utf-8")


def remove_forged_results(message: bytes, authserv_id: str) -> bytes:
    """Drop incoming Authentication-Results headers that claim to be ours (RFC 8601 §5)."""
    header, body = split_header(message)
    pattern = re.compile(
        rb"(?im)^authentication-results:[ \t]*" + re.escape(authserv_id.encode()) +
        rb"[ \t]*;.*(?:\r?\n[ \t].*)*\r?\n"
    )
    cleaned = pattern.sub(b"", header)
    return cleaned + body if cleaned != header else message


def _from_domain(message: bytes) -> str | None:
    header, _ = split_header(message)
    values = re.findall(rb"(?im)^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", header)
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", " ").replace("\n", " ")
    addresses = [a for _, a in email.utils.getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None


def _value(text: str) -> str:
    # RFC 8601 values are tokens; anything else is quoted.
    if re.fullmatch(r"[A-Za-z0-9.@_+=/-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
