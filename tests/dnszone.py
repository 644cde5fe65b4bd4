"""A real DNS server with test zones: Twisted's own `twistd dns`, on loopback, for the session.

The zones carry SPF, DKIM and DMARC records for the sender domains the tests use; nothing here
ever reaches the machine's own resolver.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers import program

SELECTOR = "sel"
# domain: (SPF record or None, DMARC record or None, has a DKIM key)
DOMAINS: dict[str, tuple[str | None, str | None, bool]] = {
    "spf-pass.test": ("v=spf1 ip4:127.0.0.0/8 -all", None, False),
    "spf-fail.test": ("v=spf1 ip4:192.0.2.1 -all", None, False),
    "spf-softfail.test": ("v=spf1 ip4:192.0.2.1 ~all", None, False),
    "spf-none.test": (None, None, False),
    "dkim.test": ("v=spf1 ip4:192.0.2.1 -all", "v=DMARC1; p=reject", True),
    "dmarc-reject.test": ("v=spf1 ip4:192.0.2.1 -all", "v=DMARC1; p=reject", True),
    "dmarc-quarantine.test": ("v=spf1 ip4:192.0.2.1 -all", "v=DMARC1; p=quarantine", False),
    "dmarc-pass.test": ("v=spf1 ip4:127.0.0.0/8 -all", "v=DMARC1; p=reject", False),
}


# Zones for outbound delivery: MX records (Twisted's pyzone: MX(name, preference, exchange)).
MAIL_ZONES: dict[str, list[str]] = {
    "mx.test": ["MX('mx.test', 20, 'backup.mx.test')", "MX('mx.test', 10, 'primary.mx.test')",
                "A('primary.mx.test', '127.0.0.1')", "A('backup.mx.test', '127.0.0.1')"],
    "implicit.test": ["A('implicit.test', '127.0.0.1')"],
    "nullmx.test": ["MX('nullmx.test', 0, b'')"],  # RFC 7505: the root name
    "nomail.test": [],
}


@dataclass
class DNSServer:
    port: int
    private_key_pem: bytes
    process: subprocess.Popen[bytes]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_port() -> int:
    # The same number must be free for UDP and TCP; twistd dns binds both.
    for _ in range(50):
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            udp.close()
            tcp.close()
        return port
    raise AssertionError("no free port for the test DNS server")


def _txt(value: str) -> str:
    chunks = [value[i : i + 250].encode() for i in range(0, len(value), 250)]
    return ", ".join(repr(c) for c in chunks)


def write_zones(directory: Path, public_key_b64: str) -> list[Path]:
    files = []
    for domain, (spf_record, dmarc, has_dkim) in DOMAINS.items():
        lines = [
            f"SOA({domain!r}, mname='ns.{domain}', rname='hostmaster.{domain}', serial=1, "
            "refresh='1H', retry='1H', expire='1H', minimum='1M', ttl='1M'),",
            f"NS({domain!r}, 'ns.{domain}'),",
            f"A('ns.{domain}', '127.0.0.1'),",
        ]
        if spf_record:
            lines.append(f"TXT({domain!r}, {_txt(spf_record)}),")
        if dmarc:
            lines.append(f"TXT('_dmarc.{domain}', {_txt(dmarc)}),")
        if has_dkim:
            key = f"v=DKIM1; k=rsa; p={public_key_b64}"
            lines.append(f"TXT('{SELECTOR}._domainkey.{domain}', {_txt(key)}),")
        path = directory / f"{domain}.zone"
        path.write_text("zone = [\n    " + "\n    ".join(lines) + "\n]\n")
        files.append(path)
    for domain, records in MAIL_ZONES.items():
        lines = [
            f"SOA({domain!r}, mname='ns.{domain}', rname='hostmaster.{domain}', serial=1, "
            "refresh='1H', retry='1H', expire='1H', minimum='1M', ttl='1M'),",
            f"NS({domain!r}, 'ns.{domain}'),",
            f"A('ns.{domain}', '127.0.0.1'),",
            *(f"{record}," for record in records),
        ]
        path = directory / f"{domain}.zone"
        path.write_text("zone = [\n    " + "\n    ".join(lines) + "\n]\n")
        files.append(path)
    return files


def start_dns(directory: Path) -> DNSServer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    zones = write_zones(directory, base64.b64encode(public_der).decode())
    port = _free_port()
    argv = [program("twistd"), "-n", "--pidfile=", f"--logfile={directory / 'dns.log'}", "dns",
            "-i", "127.0.0.1", "-p", str(port)]
    for zone in zones:
        argv += ["--pyzone", str(zone)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    query = dns.message.make_query("spf-pass.test", "SOA")
    deadline = time.monotonic() + 30
    while True:  # readiness: the server answers a query (each try waits up to 0.2 s for it)
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            break
        except (dns.exception.Timeout, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log = (directory / "dns.log").read_text() if (directory / "dns.log").exists() else ""
                raise AssertionError(f"the test DNS server did not start:\n{log}") from None
    return DNSServer(port, private_pem, process)
