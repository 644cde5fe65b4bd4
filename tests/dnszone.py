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
    # Remote MXs for delivery tests: a sink listens on 127.0.0.2; nothing on 127.0.0.3.
    "remote.test": ["MX('remote.test', 10, 'mx.remote.test')", "A('mx.remote.test', '127.0.0.2')"],
    "down.test": ["MX('down.test', 10, 'mx.down.test')", "A('mx.down.test', '127.0.0.3')"],
    "fallback.test": ["MX('fallback.test', 10, 'mx.down.test')",
                      "MX('fallback.test', 20, 'mx.remote.test')"],
    # A domain hosted by the test server (mx.example.test) that published what ESP asks for,
    # except DKIM and DMARC.
    "hosted.test": ["MX('hosted.test', 10, 'mx.example.test')",
                    "TXT('hosted.test', b'v=spf1 mx ~all')"],
    # Names certificates are issued for by Pebble: A records only (its VA would try an AAAA
    # first, where ESP's challenge responder does not listen).
    "acme-one.test": ["A('acme-one.test', '127.0.0.1')", "A('mail.acme-one.test', '127.0.0.1')"],
    "acme-two.test": ["A('acme-two.test', '127.0.0.1')", "A('mail.acme-two.test', '127.0.0.1')"],
}


@dataclass
class DNSServer:
    port: int
    private_key_pem: bytes
    process: subprocess.Popen[bytes]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_dns_port() -> int:
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
        records = []
        if spf_record:
            records.append(txt_record(domain, spf_record))
        if dmarc:
            records.append(txt_record(f"_dmarc.{domain}", dmarc))
        if has_dkim:
            records.append(txt_record(f"{SELECTOR}._domainkey.{domain}",
                                      f"v=DKIM1; k=rsa; p={public_key_b64}"))
        files.append(zone_file(directory, domain, records))
    for domain, records in MAIL_ZONES.items():
        files.append(zone_file(directory, domain, records))
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
    port = free_dns_port()
    process = serve_zones(directory, zones, port)
    return DNSServer(port, private_pem, process)


def zone_file(directory: Path, domain: str, records: list[str]) -> Path:
    """A pyzone file for ``domain`` with its SOA, NS and ``records`` (Twisted's Record_*
    constructors as text)."""
    lines = [
        f"SOA({domain!r}, mname='ns.{domain}', rname='hostmaster.{domain}', serial=1, "
        "refresh='1H', retry='1H', expire='1H', minimum='1M', ttl='1M'),",
        f"NS({domain!r}, 'ns.{domain}'),",
        f"A('ns.{domain}', '127.0.0.1'),",
        *(f"{record}," for record in records),
    ]
    path = directory / f"{domain}.zone"
    path.write_text("zone = [\n    " + "\n    ".join(lines) + "\n]\n")
    return path


def txt_record(name: str, value: str) -> str:
    """A TXT record in strings of at most 250 bytes."""
    return f"TXT({name!r}, {_txt(value)})"


def serve_zones(
    directory: Path, zones: list[Path], port: int, host: str = "127.0.0.1",
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``twistd dns`` serving ``zones`` on ``host:port`` (UDP and TCP), once it answers."""
    log = log or directory / "dns.log"
    argv = [program("twistd"), "-n", "--pidfile=", f"--logfile={log}", "dns",
            "-i", host, "-p", str(port)]
    for zone in zones:
        argv += ["--pyzone", str(zone)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    probe = zones[0].name.removesuffix(".zone")
    query = dns.message.make_query(probe, "SOA")
    deadline = time.monotonic() + 30
    while True:  # readiness: the server answers a query (each try waits up to 0.2 s for it)
        try:
            dns.query.udp(query, host, port=port, timeout=0.2)
            return process
        except (dns.exception.Timeout, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                text = log.read_text() if log.exists() else ""
                raise AssertionError(f"the test DNS server did not start:\n{text}") from None
