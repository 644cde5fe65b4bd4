"""``esp cert``: issue, list, show, renew, import and remove TLS certificates.

The CLI does not talk to the CA itself: ``issue`` and ``renew`` record the request and notify
the running servers, whose certificate manager orders the certificate (its HTTP-01 responder
answers the CA); ``--wait`` follows the outcome.  ``import`` serves a certificate made
elsewhere (certbot, a corporate CA) on every node at once."""

from __future__ import annotations

import argparse
import select
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives import serialization

from esp.addresses import InvalidAddress, normalize_domain
from esp.certs.manager import key_context
from esp.cli import Refused, UsageProblem, _actor, open_database
from esp.config import Config
from esp.storage.certificates import (
    CHANNEL,
    DUE_CHANNEL,
    CertificateConflict,
    CertificateRow,
    NewCertificate,
    get_certificate_txn,
    import_certificate_txn,
    list_certificates_txn,
    remove_certificate_txn,
    renew_now_txn,
    request_certificate_txn,
)
from esp.storage.db import run_sync
from esp.storage.dkimkeys import SecretBox
from esp.tls import CertificateError, ServedCertificate, covers


def certificate_name(name: str) -> str:
    """A name as certificates carry it: lower case A-labels, no trailing dot; ``*.`` kept."""
    wildcard = name.startswith("*.")
    try:
        plain = normalize_domain(name[2:] if wildcard else name)
    except InvalidAddress as e:
        raise UsageProblem(f"{name}: {e}") from None
    return ("*." if wildcard else "") + plain.rstrip(".")


def _status(row: CertificateRow) -> str:
    if row.chain_pem is None:
        return f"waiting: {row.last_error}" if row.last_error else "waiting for issuance"
    if row.last_error:
        return f"in service; last renewal failed: {row.last_error}"
    return "in service"


def _line(row: CertificateRow) -> str:
    until = row.not_after.strftime("%Y-%m-%d %H:%M UTC") if row.not_after else "-"
    return f"{row.id}\t{','.join(row.names)}\t{row.source}\t{until}\t{_status(row)}\n"


def cmd_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        rows = run_sync(connection, list_certificates_txn)
    for row in rows:
        out.write(_line(row))
    return 0


def _find(connection: Any, name: str) -> CertificateRow:
    row = run_sync(connection, get_certificate_txn, int(name) if name.isdigit() else name)
    if row is None:
        raise Refused(f"no certificate for {name}")
    return row


def _when(moment: datetime | None) -> str:
    return moment.isoformat() if moment is not None else "-"


def cmd_show(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        row = _find(connection, args.name)
    fields = {
        "names": ", ".join(row.names), "domain": row.domain or "-", "source": row.source,
        "provider": row.provider or "-", "status": _status(row),
        "issuer": row.issuer or "-", "serial": row.serial or "-",
        "not before": _when(row.not_before),
        "not after": _when(row.not_after),
        "renew at": _when(row.renew_at),
        "failures": str(row.failures),
        "next attempt": _when(row.next_attempt(datetime.now(UTC))),
    }
    for key, value in fields.items():
        out.write(f"{key + ':':14}{value}\n")
    return 0


def _wait(connection: Any, before: CertificateRow, seconds: float, out: TextIO) -> int:
    """Follow the request until the certificate changes or an attempt fails."""
    connection.autocommit = True
    with connection.cursor() as cur:
        cur.execute(f"LISTEN {CHANNEL}")
        cur.execute(f"LISTEN {DUE_CHANNEL}")
    deadline = time.monotonic() + seconds
    while True:
        row = run_sync(connection, get_certificate_txn, before.id)
        if row is None:
            raise Refused("the certificate was removed meanwhile")
        if row.serial is not None and row.serial != before.serial:
            out.write(f"issued: valid until {row.not_after}, served by every node\n")
            return 0
        if row.failures > before.failures:
            out.write(f"failed: {row.last_error} (next try at {row.next_attempt_at})\n")
            return 1
        left = deadline - time.monotonic()
        if left <= 0:
            out.write("still waiting (is ESP running with security.tls.acme.enabled?); "
                      "`esp cert show` tells how it goes\n")
            return 1
        select.select([connection], [], [], left)
        connection.poll()
        connection.notifies.clear()


def cmd_issue(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    acme = config.security.tls.acme
    provider = args.provider or acme.provider
    if provider not in acme.all_providers():
        raise UsageProblem(f"no ACME provider {provider!r} (configured: "
                           f"{', '.join(sorted(acme.all_providers()))})")
    names = [certificate_name(n) for n in args.names]
    with open_database(config) as connection:
        row, made = run_sync(connection, request_certificate_txn, names, provider, _actor())
        if row.source != "acme":
            raise Refused(f"{names[0]} has an imported certificate: `esp cert remove` it first")
        if not made:
            row = run_sync(connection, renew_now_txn, row.id, _actor()) or row
        out.write(f"certificate {row.id} for {', '.join(row.names)} requested from {provider}"
                  + ("" if acme.enabled else " (security.tls.acme.enabled is off here: a "
                     "node with it on orders it)") + "\n")
        if args.wait:
            return _wait(connection, row, args.wait, out)
    return 0


def cmd_renew(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        before = _find(connection, args.name)
        row = run_sync(connection, renew_now_txn, before.id, _actor())
        if row is None:
            raise Refused(f"{args.name}: only ACME certificates are renewed by ESP")
        out.write(f"renewal of {', '.join(row.names)} requested\n")
        if args.wait:
            return _wait(connection, before, args.wait, out)
    return 0


def cmd_import(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    try:
        served = ServedCertificate.from_pem(args.cert.read_bytes(), args.key.read_bytes())
    except OSError as e:
        raise UsageProblem(f"cannot read {e.filename}: {e.strerror}") from None
    except CertificateError as e:
        raise UsageProblem(str(e)) from None
    if args.name:
        wanted = tuple(certificate_name(n) for n in args.name)
        uncovered = [n for n in wanted if not covers(served.names, n)]
        if uncovered:
            raise UsageProblem(f"the certificate is not for {', '.join(uncovered)} (it is for "
                               f"{', '.join(served.names)})")
        served = ServedCertificate(wanted, served.chain, served.key)
    leaf = served.leaf
    box = SecretBox(config.dkim_secret_file, create=True)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in served.chain)
    key_pem = served.key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    new = NewCertificate(chain.decode(), b"", leaf.not_valid_before_utc,
                         leaf.not_valid_after_utc, leaf.issuer.rfc4514_string(),
                         format(leaf.serial_number, "x"), None)
    with open_database(config) as connection:
        try:
            certificate_id = run_sync(
                connection, import_certificate_txn, served.names, new,
                lambda row_id: box.seal(key_pem, key_context(row_id)), _actor())
        except CertificateConflict as e:
            raise Refused(str(e)) from None
    out.write(f"certificate {certificate_id} for {', '.join(served.names)} imported, valid "
              f"until {leaf.not_valid_after_utc:%Y-%m-%d}; every node serves it now\n")
    return 0


def cmd_remove(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    with open_database(config) as connection:
        row = _find(connection, args.name)
        run_sync(connection, remove_certificate_txn, row.id, _actor())
    out.write(f"certificate for {args.name} removed\n")
    return 0


def add_commands(commands: Any) -> None:
    cert = commands.add_parser("cert", help="TLS certificates (docs/certificates.md)"
                               ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cert.add_parser("issue", help="have ACME issue a certificate for names (the first "
                        "names it); the server orders it")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--provider", help="an ACME provider of the configuration")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="follow the order until it succeeds or fails")
    p.set_defaults(run=cmd_issue)
    p = cert.add_parser("list", help="certificates, their expiry and state")
    p.set_defaults(run=cmd_list)
    p = cert.add_parser("show", help="one certificate (by a name or its id)")
    p.add_argument("name")
    p.set_defaults(run=cmd_show)
    p = cert.add_parser("renew", help="renew an ACME certificate now")
    p.add_argument("name")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS")
    p.set_defaults(run=cmd_renew)
    p = cert.add_parser("import", help="serve a certificate made elsewhere (certbot, a "
                        "corporate CA)")
    p.add_argument("--cert", type=Path, required=True, help="PEM chain, leaf first")
    p.add_argument("--key", type=Path, required=True, help="PEM private key (unencrypted)")
    p.add_argument("--name", action="append",
                   help="the names to serve it for (default: its DNS names)")
    p.set_defaults(run=cmd_import)
    p = cert.add_parser("remove", help="stop serving a certificate")
    p.add_argument("name")
    p.set_defaults(run=cmd_remove)
